"""Resource limits and backpressure for growth.

The trainer asks :class:`Admission` before it germinates a seed. A germination is refused (the
slot stays dormant and the controller may ask again at a later boundary) when it would exceed a
bound: compiles in flight, or bytes of kernel artifacts loaded in slots. Refusing at the source
keeps every queue behind it bounded: the ready-kernel buffer never holds more than
``max_compiles_in_flight`` kernels, and loaded kernels never exceed ``max_kernel_bytes`` (counted
with the artifact size, a close proxy for the parameters it loads).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ("Admission", "ResourceLimits")


@dataclass(frozen=True)
class ResourceLimits:
    """Bounds on growth.

    :ivar max_compiles_in_flight: germinations whose kernel is not back yet.
    :ivar max_kernel_bytes: artifact bytes of the kernels loaded in slots at once.
    :raises ValueError: if a bound is not positive.
    """

    max_compiles_in_flight: int = 4
    max_kernel_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_compiles_in_flight < 1 or self.max_kernel_bytes < 1:
            raise ValueError(f"resource limits must be positive, got {self}")


class Admission:
    """Counts what is in flight and loaded; says whether more may start.

    :param limits: the bounds.
    """

    def __init__(self, limits: ResourceLimits | None = None) -> None:
        self.limits = limits or ResourceLimits()
        self.in_flight = 0
        self.loaded_bytes = 0
        self.refused = 0

    def refusal(self) -> str | None:
        """Why a germination may not start now, or ``None`` if it may."""
        lim = self.limits
        if self.in_flight >= lim.max_compiles_in_flight:
            return f"{self.in_flight} compiles in flight (limit {lim.max_compiles_in_flight})"
        if self.loaded_bytes >= lim.max_kernel_bytes:
            return f"{self.loaded_bytes} kernel bytes loaded (limit {lim.max_kernel_bytes})"
        return None

    def try_start(self) -> str | None:
        """Reserve a compile slot; return why not (and count the refusal) if over a bound."""
        reason = self.refusal()
        if reason is None:
            self.in_flight += 1
        else:
            self.refused += 1
        return reason

    def reserve(self) -> None:
        """Count a compile in flight that is started regardless of the bounds (one re-issued
        after a rollback or a resume: its germination was admitted before)."""
        self.in_flight += 1

    def finished(self) -> None:
        """A compile's outcome reached the trainer (kernel or error)."""
        self.in_flight = max(0, self.in_flight - 1)

    def set_loaded(self, nbytes: int) -> None:
        """The bytes of kernels loaded in slots now."""
        self.loaded_bytes = nbytes
