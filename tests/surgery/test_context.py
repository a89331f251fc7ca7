from __future__ import annotations

import pytest
import torch
from torch import nn

from esper_async.errors import SurgeryError
from esper_async.surgery._context import OptimizerSnapshot, SurgeryContext, eval_mode

from ._helpers import TinyNet, assert_same, fingerprint, images, tiny_mlp, train, vectors


def test_optimizer_snapshot_restores_groups_and_state_exactly() -> None:
    model = tiny_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, vectors(), 2)
    before = fingerprint(model, opt)
    groups = opt.param_groups[0]
    snapshot = OptimizerSnapshot(opt)
    extra = nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra], "lr": 5.0})
    groups["params"].pop()
    groups["lr"] = 1.0
    opt.state.pop(model[0].weight)
    snapshot.restore()
    assert opt.param_groups[0] is groups
    assert_same(before, fingerprint(model, opt))


def test_unknown_names_list_close_candidates() -> None:
    ctx = SurgeryContext(TinyNet(), None, images(2)[0])
    with pytest.raises(SurgeryError, match=r"no module named 'layer1\.0\.conv9'.*layer1\.0\.conv1"):
        ctx.resolve("layer1.0.conv9", operation="op")


@pytest.mark.parametrize(
    ("paths", "region"),
    [
        pytest.param(
            ["layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"], "layer1.0", id="one-block"
        ),
        pytest.param(["layer1.0.conv1", "layer1.1.conv1"], "layer1", id="two-blocks"),
        pytest.param(["stem.0", "head.0"], "", id="root"),
        pytest.param(["head.0"], "head.0", id="single"),
    ],
)
def test_the_region_is_the_smallest_module_holding_every_change(
    paths: list[str], region: str
) -> None:
    ctx = SurgeryContext(TinyNet(), None, images(2)[0])
    for path in paths:
        ctx.replace(path, nn.Identity(), operation="op")
    assert ctx.region_since(0) == region


def test_reverted_shows_the_old_structure_then_the_new() -> None:
    model = TinyNet()
    old = model.head[0]
    ctx = SurgeryContext(model, None, images(2)[0])
    ctx.replace("head.0", nn.Linear(8, 12), operation="op")
    new = model.head[0]
    with ctx.reverted(0):
        assert model.head[0] is old
    assert model.head[0] is new
    ctx.undo_to(0)
    assert model.head[0] is old


def test_capture_stops_once_the_module_returned_and_caches() -> None:
    model = TinyNet()
    calls = {"head": 0}
    model.head.register_forward_hook(lambda *_: calls.__setitem__("head", calls["head"] + 1))
    ctx = SurgeryContext(model, None, images(2)[0])
    first = ctx.capture([model.stem], operation="op")[id(model.stem)]
    assert first.args[0].shape == (2, 3, 8, 8) and first.output.shape == (2, 6, 8, 8)
    assert calls["head"] == 0, "the probe forward must stop after the watched module"
    assert ctx.capture([model.stem], operation="op")[id(model.stem)] is first


def test_capture_of_a_module_that_never_runs_is_an_error() -> None:
    model = TinyNet()
    model.unused = nn.Linear(2, 2)
    ctx = SurgeryContext(model, None, images(2)[0])
    with pytest.raises(SurgeryError, match="not called"):
        ctx.capture([model.unused], operation="op")


def test_eval_mode_restores_each_modules_own_flag() -> None:
    model = TinyNet()
    model.stem[1].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and not model.stem[1].training and model.head.training
