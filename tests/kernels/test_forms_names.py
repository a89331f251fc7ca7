"""A kernel's parameters keep their names in every execution form (checkpoints and reproducible runs
must not depend on which form the optimizer measured fastest)."""

from __future__ import annotations

import pytest
import torch

import esper_async as ea
from esper_async.blueprints import SlotContract, SlotKind

CONTRACT = SlotContract(SlotKind.CONV, (4, 8, 8))


@pytest.mark.parametrize("form", ["channels_last", "bf16"])
def test_every_form_keeps_the_programs_parameter_names_and_tensors(form: str) -> None:
    kernel = ea.export_kernel(ea.Blueprint("residual_conv"), CONTRACT, seed=1)
    plain = ea.load_kernel(kernel, form="export")
    other = ea.load_kernel(kernel, form=form)
    assert list(other.state_dict()) == list(plain.state_dict())
    assert all(name.startswith("program.") for name in other.state_dict())
    # One tensor per parameter: the form does not hold a second copy an optimizer would miss.
    assert len(list(other.parameters())) == len(list(plain.parameters()))
    other.load_state_dict(plain.state_dict())
    x = torch.randn(3, *CONTRACT.shape)
    atol = 5e-2 if form == "bf16" else 1e-6
    torch.testing.assert_close(other(x), plain(x), atol=atol, rtol=0.0)
    # The form still runs its own way.
    if form == "channels_last":
        assert next(p for p in other.parameters() if p.dim() == 4).is_contiguous(
            memory_format=torch.channels_last)


def test_a_state_dict_saved_in_one_form_loads_into_another() -> None:
    kernel = ea.export_kernel(ea.Blueprint("residual_conv"), CONTRACT, seed=2)
    trained = ea.load_kernel(kernel, form="channels_last")
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1)
    fresh = ea.load_kernel(kernel, form="export")
    fresh.load_state_dict(trained.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                  trained.state_dict().values(), strict=True))
