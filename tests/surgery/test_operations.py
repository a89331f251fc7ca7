from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from esper_async.errors import SurgeryError
from esper_async.surgery import (
    AddResidual,
    GatedResidual,
    InsertAfter,
    ModelSurgeon,
    RemoveLayer,
    SkipAround,
    SurgeryOperation,
    identity_conv2d,
    identity_linear,
)

from ._helpers import TinyNet, assert_same, evaluate, fingerprint, images, tiny_mlp, train, vectors


def _adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-2)


@pytest.mark.asyncio
async def test_insert_into_a_sequential_renumbers_and_preserves() -> None:
    model = tiny_mlp()
    opt = _adam(model)
    x = vectors()[0]
    expected = evaluate(model, x)
    new = identity_linear(16)
    await ModelSurgeon().apply(model, opt, InsertAfter("2", new), probe=x[:4])
    assert [type(m).__name__ for m in model] == [
        "Linear",
        "ReLU",
        "Linear",
        "Linear",
        "ReLU",
        "Linear",
    ]
    assert model[3] is new
    assert torch.allclose(evaluate(model, x), expected, atol=1e-6)
    assert any(new.weight is p for g in opt.param_groups for p in g["params"])


@pytest.mark.asyncio
async def test_insert_elsewhere_wraps_the_target_in_a_sequential() -> None:
    model = TinyNet()
    opt = _adam(model)
    x = images(6)[0]
    expected = evaluate(model, x)
    await ModelSurgeon().apply(
        model, opt, InsertAfter("layer1.0.bn1", identity_conv2d(6)), probe=x[:4]
    )
    wrapped = model.layer1[0].bn1
    assert isinstance(wrapped, nn.Sequential) and isinstance(wrapped[0], nn.BatchNorm2d)
    assert torch.allclose(evaluate(model, x), expected, atol=1e-5)


@pytest.mark.asyncio
async def test_a_new_group_takes_the_neighbours_hyperparameters() -> None:
    model = tiny_mlp()
    opt = torch.optim.Adam(
        [
            {"params": model[0].parameters(), "lr": 0.5},
            {"params": model[2].parameters(), "lr": 0.25},
            {"params": model[4].parameters()},
        ],
        lr=0.1,
    )
    await ModelSurgeon().apply(
        model, opt, InsertAfter("2", identity_linear(16)), probe=vectors(4)[0]
    )
    assert len(opt.param_groups) == 4
    assert opt.param_groups[-1]["lr"] == 0.25


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("target", "bridge", "kind"),
    [
        pytest.param("layer1.0", "auto", nn.Identity, id="same-shape-identity"),
        pytest.param("layer1.1", "auto", nn.Conv2d, id="strided-conv-projection"),
        pytest.param("head.0", "auto", nn.Linear, id="linear-projection"),
        pytest.param("layer1.0", "projection", nn.Conv2d, id="forced-projection"),
    ],
)
async def test_remove_bridges_the_gap(target: str, bridge: str, kind: type[nn.Module]) -> None:
    model = TinyNet()
    opt = _adam(model)
    removed = model.get_submodule(target)
    await ModelSurgeon().apply(model, opt, RemoveLayer(target, bridge=bridge), probe=images(8)[0])  # type: ignore[arg-type]
    assert isinstance(model.get_submodule(target), kind)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in held for p in removed.parameters())
    assert all(id(p) in held for p in model.parameters())


@pytest.mark.asyncio
async def test_a_projection_bridge_imitates_a_linear_layer_it_replaces() -> None:
    model = nn.Sequential(nn.Linear(8, 5), nn.Linear(5, 3))
    x = torch.randn(32, 8)
    expected = evaluate(model, x)
    await ModelSurgeon().apply(model, None, RemoveLayer("1"), probe=x)
    # The removed layer is linear, so the least-squares bridge reproduces the output.
    assert torch.allclose(evaluate(model, x), expected, atol=1e-4)


@pytest.mark.asyncio
async def test_an_identity_bridge_across_a_shape_change_is_refused() -> None:
    model = TinyNet()
    opt = _adam(model)
    before = fingerprint(model, opt)
    with pytest.raises(SurgeryError, match="identity bridge needs equal shapes") as info:
        await ModelSurgeon().apply(
            model, opt, RemoveLayer("layer1.1", bridge="identity"), probe=images(4)[0]
        )
    assert info.value.operation == "remove 'layer1.1' (identity bridge)"
    assert_same(before, fingerprint(model, opt))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("target", "shortcut"),
    [
        pytest.param("layer1.0", nn.Identity, id="identity-shortcut"),
        pytest.param("layer1.1", nn.Conv2d, id="conv-shortcut"),
        pytest.param("head.0", nn.Linear, id="linear-shortcut"),
    ],
)
async def test_add_residual_preserves_and_wraps(target: str, shortcut: type[nn.Module]) -> None:
    model = TinyNet()
    opt = _adam(model)
    x = images(6)[0]
    expected = evaluate(model, x)
    await ModelSurgeon().apply(model, opt, AddResidual(target), probe=x[:4])
    wrapper = model.get_submodule(target)
    assert isinstance(wrapper, SkipAround) and isinstance(wrapper.shortcut, shortcut)
    assert torch.allclose(evaluate(model, x), expected, atol=1e-6)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("operation", "message"),
    [
        pytest.param(
            InsertAfter("head.9", identity_linear(4)),
            "no module named 'head.9'",
            id="insert-unknown",
        ),
        pytest.param(RemoveLayer("nope"), "no module named 'nope'", id="remove-unknown"),
        pytest.param(AddResidual(""), "root module has no parent", id="residual-root"),
        pytest.param(InsertAfter("head.0", identity_linear(5)), "failed", id="insert-wrong-width"),
    ],
)
async def test_bad_input_is_a_surgery_error_and_changes_nothing(
    operation: SurgeryOperation, message: str
) -> None:
    model = TinyNet()
    opt = _adam(model)
    train(model, opt, images(), 1)
    before = fingerprint(model, opt)
    with pytest.raises(SurgeryError, match=message):
        await ModelSurgeon().apply(model, opt, operation, probe=images(4)[0])
    assert_same(before, fingerprint(model, opt))


@pytest.mark.asyncio
async def test_removing_a_layer_no_simple_bridge_fits_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 2))
    opt = _adam(model)
    before = fingerprint(model, opt)
    with pytest.raises(SurgeryError, match=r"incompatible shapes \(4, 3, 8, 8\) → \(4, 4, 6, 6\)"):
        await ModelSurgeon().apply(model, opt, RemoveLayer("0"), probe=images(4)[0])
    assert_same(before, fingerprint(model, opt))


CONTINUE: list[Callable[[], SurgeryOperation]] = [
    lambda: InsertAfter("head.1", identity_linear(12)),
    lambda: InsertAfter("layer1.1", GatedResidual(identity_conv2d(8))),
    lambda: RemoveLayer("layer1.0"),
    lambda: RemoveLayer("layer1.1"),
    lambda: AddResidual("layer1.1"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("factory", [pytest.param(f, id=f().describe()) for f in CONTINUE])
async def test_training_continues_and_new_parameters_learn(
    factory: Callable[[], SurgeryOperation],
) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    opt = _adam(model)
    data = images(32)
    train(model, opt, data, 10)
    old = {id(p) for p in model.parameters()}
    await ModelSurgeon().apply(model, opt, factory(), probe=data[0][:4])
    new = [p.detach().clone() for p in model.parameters() if id(p) not in old]
    fresh = [p for p in model.parameters() if id(p) not in old]
    losses = train(model, opt, data, 12)
    assert losses[-1] < losses[0]
    for before, param in zip(new, fresh, strict=True):
        assert not torch.equal(before, param.detach()), "the optimizer must step new parameters"
