from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from esper_async.errors import SurgeryError
from esper_async.surgery import AddSkip, FxRewire, GatedShortcut, ModelSurgeon

from ._helpers import TinyNet, assert_same, evaluate, fingerprint, images, train


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("source", "destination", "scope", "shortcut"),
    [
        pytest.param(
            "layer1.0.conv1", "layer1.0.bn2", "layer1.0", nn.Identity, id="inside-a-block"
        ),
        pytest.param("layer1.0", "layer1.1", "layer1", nn.Conv2d, id="across-blocks-strided"),
        pytest.param("stem", "layer1.0", "", nn.Identity, id="root-scope"),
    ],
)
async def test_a_skip_is_function_preserving_and_trains(
    source: str, destination: str, scope: str, shortcut: type[nn.Module]
) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = images(32)
    train(model, opt, data, 5)
    expected = evaluate(model, data[0])
    changed = await ModelSurgeon().apply(
        model, opt, AddSkip(source, destination, scope=scope), probe=data[0][:4]
    )
    assert (changed is model) == bool(scope), "only a root rewire hands back a new model"
    model = changed
    traced = model.get_submodule(scope)
    assert isinstance(traced, fx.GraphModule)
    skip = traced.esper_skip0
    assert isinstance(skip, GatedShortcut) and isinstance(skip.shortcut, shortcut)
    assert torch.allclose(evaluate(model, data[0]), expected, rtol=1e-5, atol=1e-6)
    losses = train(model, opt, data, 10)
    assert losses[-1] < losses[0]
    assert skip.gate.detach().abs().item() > 0, "the optimizer must step the new gate"


@pytest.mark.asyncio
async def test_a_root_rewire_hands_back_the_new_model() -> None:
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters())
    x = images(6)[0]
    expected = evaluate(model, x)

    def gelu_for_relu(gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.relu:
                node.target = torch.nn.functional.gelu

    async with ModelSurgeon().transaction(model, opt, probe=x[:4]) as tx:
        await tx.stage(FxRewire(gelu_for_relu))
    assert isinstance(tx.model, fx.GraphModule) and tx.model is not model
    assert "gelu" in tx.model.code
    assert not torch.allclose(evaluate(tx.model, x), expected)
    # Parameters are shared, so the optimizer state carries over untouched.
    assert {id(p) for p in tx.model.parameters()} == {id(p) for p in model.parameters()}


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.mean() > 0:  # data-dependent control flow
            return self.b(h)
        return self.b(-h)


def _noop(gm: fx.GraphModule) -> None:
    del gm


def _broken(gm: fx.GraphModule) -> None:
    raise ValueError("cannot do that")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("model", "probe", "operation", "message"),
    [
        pytest.param(
            _Branchy(), torch.randn(3, 4), AddSkip("a", "b"), "not traceable", id="untraceable-skip"
        ),
        pytest.param(
            _Branchy(), torch.randn(3, 4), FxRewire(_noop), "not traceable", id="untraceable-rewire"
        ),
        pytest.param(
            TinyNet(),
            images(4)[0],
            AddSkip("layer1.1", "layer1.0", scope="layer1"),
            "does not run before",
            id="backwards-skip",
        ),
        pytest.param(
            TinyNet(),
            images(4)[0],
            AddSkip("stem.0", "layer1.0", scope="layer1"),
            "not inside the scope",
            id="outside-scope",
        ),
        pytest.param(
            TinyNet(),
            images(4)[0],
            AddSkip("layer1.0", "layer1.7", scope="layer1"),
            "no module named 'layer1.7'",
            id="unknown-end",
        ),
        pytest.param(
            TinyNet(),
            images(4)[0],
            AddSkip("stem", "head.0"),
            "incompatible shapes",
            id="no-simple-shortcut",
        ),
        pytest.param(
            TinyNet(),
            images(4)[0],
            FxRewire(_broken, scope="head"),
            "the transform failed: cannot do that",
            id="failing-transform",
        ),
    ],
)
async def test_fx_errors_are_surgery_errors_and_change_nothing(
    model: nn.Module, probe: torch.Tensor, operation: AddSkip | FxRewire, message: str
) -> None:
    opt = torch.optim.Adam(model.parameters())
    before = fingerprint(model, opt)
    with pytest.raises(SurgeryError, match=message):
        await ModelSurgeon().apply(model, opt, operation, probe=probe)
    assert_same(before, fingerprint(model, opt))
