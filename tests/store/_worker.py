"""A store client run as a separate process by ``test_processes.py``.

``python _worker.py crash STORE KERNELS PREFIX``
    puts the kernels in a tight loop (new blobs first, then more keys for the same blobs)
    until the parent kills it.
``python _worker.py mixed STORE KERNELS INDEX WORKERS RESULT``
    waits until every worker is ready, then writes its own kernels and a shared key while
    reading everyone else's, and writes what it saw to RESULT as JSON.
"""

from __future__ import annotations

import itertools
import json
import pickle
import sys
import time
from pathlib import Path

import anyio

from esper_async.kernels import Kernel
from esper_async.store import KernelStore

SHARED_KEY = "shared-" + "0" * 57
ROUNDS = 3
DEADLINE_S = 60.0


async def crash(store_path: Path, kernels: list[Kernel], prefix: str) -> None:
    async with KernelStore(store_path, usage_flush_s=0.05) as store:
        for i in itertools.count():
            kernel = kernels[i % len(kernels)]
            await store.put(f"{prefix}-{i:06d}", kernel, tags=[f"batch-{i // len(kernels)}"])


async def mixed(
    store_path: Path, kernels: list[Kernel], index: int, workers: int, result: Path
) -> None:
    ready = store_path.parent / f"ready-{index}"
    ready.touch()
    deadline = time.monotonic() + DEADLINE_S
    while len(list(store_path.parent.glob("ready-*"))) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError("the other workers did not start")
        await anyio.sleep(0.01)
    mine = [kernels[(2 * index + j) % len(kernels)] for j in range(2)]
    expected = {f"w{w}-{r}-{j}" for w in range(workers) for r in range(ROUNDS) for j in range(2)}
    seen: dict[str, str] = {}
    shared: set[str] = set()
    async with KernelStore(store_path, memory_bytes=0, usage_flush_s=0.05) as store:
        for r in range(ROUNDS):
            for j, kernel in enumerate(mine[:2]):
                await store.put(f"w{index}-{r}-{j}", kernel, tags=[f"worker-{index}"])
            shared.add(await store.put(SHARED_KEY, mine[0]))
            for key in sorted(expected - set(seen)):
                loaded = await store.get(key)
                if loaded is not None:
                    seen[key] = loaded.kernel_id
        while set(seen) != expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"keys never appeared: {sorted(expected - set(seen))}")
            for key in sorted(expected - set(seen)):
                loaded = await store.get(key)
                if loaded is not None:
                    seen[key] = loaded.kernel_id
            await anyio.sleep(0.01)
        winner = await store.get(SHARED_KEY)
        assert winner is not None
        shared.add(winner.kernel_id)
    await anyio.Path(result).write_text(json.dumps({"seen": seen, "shared": sorted(shared)}))


def main(argv: list[str]) -> None:
    mode, store_path, kernels_path = argv[0], Path(argv[1]), Path(argv[2])
    kernels: list[Kernel] = pickle.loads(kernels_path.read_bytes())
    if mode == "crash":
        anyio.run(crash, store_path, kernels, argv[3])
    else:
        anyio.run(mixed, store_path, kernels, int(argv[3]), int(argv[4]), Path(argv[5]))


if __name__ == "__main__":
    main(sys.argv[1:])
