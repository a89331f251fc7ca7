"""Child process of the kill-and-resume test: the demo with fast growth and checkpoints.

    python _resume_child.py RUN_DIR STORE_DIR EPOCHS
"""

from __future__ import annotations

import sys

import anyio
import torch

from esper_async.apps.demo import DemoConfig, run_demo
from esper_async.control._controller import ControllerConfig

EAGER = ControllerConfig.eager()


def config(run_dir: str, store: str, epochs: int) -> DemoConfig:
    return DemoConfig(
        epochs=epochs, seed=0, limit=600, controller=EAGER, run_dir=run_dir, store=store,
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_dir, store, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    anyio.run(run_demo, config(run_dir, store, epochs))
