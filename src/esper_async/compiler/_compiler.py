"""``BlueprintCompiler``: turns a blueprint into a kernel without blocking the event loop."""

from __future__ import annotations

import anyio

from ..blueprints import Blueprint, SlotContract
from ..kernels import Kernel, export_kernel

__all__ = ("BlueprintCompiler",)


class BlueprintCompiler:
    """Compile blueprints into kernels in a worker thread.

    :param device_kind: the device kind kernels are built for.
    """

    def __init__(self, *, device_kind: str = "cpu") -> None:
        self.device_kind = device_kind
        # torch.export keeps tracing state that is not safe to share between threads.
        self._limiter = anyio.CapacityLimiter(1)

    async def compile(self, blueprint: Blueprint, contract: SlotContract, *, seed: int = 0) -> Kernel:
        """Compile ``blueprint`` for a slot with ``contract``.

        :raises BlueprintError: if the blueprint does not fit the contract.
        :raises CompileError: if the export fails.
        """
        blueprint.check_fits(contract)
        return await anyio.to_thread.run_sync(
            lambda: export_kernel(blueprint, contract, seed=seed, device_kind=self.device_kind),
            limiter=self._limiter,
        )
