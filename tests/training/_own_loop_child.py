"""Child process of the own-loop kill-and-resume test: a hand-written loop that grows with a
:class:`esper_async.Grower` and checkpoints through ``grower.state_dict()`` after every epoch.

    python _own_loop_child.py CKPT_DIR OUT EPOCHS [--hang-after K] [--resume]

With ``--hang-after K`` it stops after the checkpoint of epoch ``K`` (and waits to be killed);
with ``--resume`` it loads the newest checkpoint of ``CKPT_DIR`` first. ``OUT`` receives the final
parameters and the record.
"""

from __future__ import annotations

import argparse

import anyio
import torch

import esper_async as ea
from esper_async.apps.data import digits_loaders
from esper_async.apps.demo import DigitsHost
from esper_async.compiler import BlueprintCompiler, OptimizerOptions
from esper_async.reliability import CheckpointStore


async def main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    data = digits_loaders(batch_size=32, seed=0, limit=400)
    model = DigitsHost()
    ea.wrap(model, ["conv1", "fc1"], example_input=torch.zeros(2, 1, 8, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    controller = ea.HeuristicController(ea.ControllerConfig.eager(), seed=0)
    # One execution form: the optimizer would otherwise pick the fastest form it measures, which
    # varies with the machine's load (the forms agree to rounding, not bitwise).
    compiler = BlueprintCompiler(options=OptimizerOptions(forms=("export",)))
    grower = ea.Grower(model, optimizer, controller=controller, compiler=compiler, seed=0)
    store = CheckpointStore(args.ckpt_dir)
    order = data.train.generator  # the shuffle order's RNG, saved with the growth state
    first = 0
    if args.resume:
        first = grower.load_state_dict(store.load(), generator=order).epoch
    async with grower:
        for epoch in range(first, args.epochs):
            model.train()
            for x, y in data.train:
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                grower.after_step(loss)
            await grower.end_epoch(data.val)
            store.save(grower.state_dict(generator=order))
            print(f"saved {epoch}", flush=True)
            if epoch == args.hang_after:
                await anyio.sleep(3600)  # the parent kills it here
    torch.save(
        {
            "model": model.state_dict(),
            "val": [r.val_loss for r in grower.result.history],
            "events": [(e.epoch, e.step, e.slot, e.target) for e in grower.result.events],
            "step": grower.step,
        },
        args.out,
    )


if __name__ == "__main__":  # compiles run in spawned worker processes
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt_dir")
    parser.add_argument("out")
    parser.add_argument("epochs", type=int)
    parser.add_argument("--hang-after", type=int, default=-1)
    parser.add_argument("--resume", action="store_true")
    anyio.run(main, parser.parse_args())
