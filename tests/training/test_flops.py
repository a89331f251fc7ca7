"""The FLOP counter against analytic counts, and its cache."""

from __future__ import annotations

import torch
from torch import nn

from esper_async.blueprints import Blueprint, SlotContract, build
from esper_async.control import EpochReport
from esper_async.control._controller import Counterfactual
from esper_async.seeds import wrap
from esper_async.training._flops import FlopCounter, FlopLedger, count_flops, kernel_compile_flops

N, IN, HIDDEN, OUT = 5, 7, 3, 4


def test_linear_counts_match_the_analytic_figures_and_are_cached() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))
    counter = FlopCounter()
    first, second = 2 * N * IN * HIDDEN, 2 * N * HIDDEN * OUT
    assert counter.forward(model, (N, IN)) == first + second
    # Backward: every layer computes its weight gradient (2·N·in·out); only the second also its
    # input's gradient (the batch does not require one), so 2× the forward for the first layer
    # and 3× for the second.
    step = counter.train_step(model, (N, IN))
    assert step == 2 * first + 3 * second
    assert counter.measurements == 2
    assert counter.train_step(model, (N, IN)) == step
    assert counter.measurements == 2  # read from the cache
    assert counter.train_step(model, (2 * N, IN)) == 2 * step  # a new shape is measured
    assert counter.measurements == 3


def test_a_linear_whose_input_needs_a_gradient_costs_three_forwards() -> None:
    layer = nn.Linear(IN, OUT)
    x = torch.zeros(N, IN, requires_grad=True)
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * N * IN * OUT


def test_measuring_leaves_the_models_gradients_and_mode_alone() -> None:
    model = nn.Linear(IN, OUT)
    model.eval()
    model(torch.ones(N, IN)).sum().backward()
    grad = model.weight.grad.clone()
    FlopCounter().train_step(model, (N, IN))
    assert torch.equal(model.weight.grad, grad)
    assert not model.training


def test_a_grafted_seed_adds_its_flops_and_ablating_it_removes_them() -> None:
    host = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))
    wrap(host, ["0"], example_input=torch.zeros(2, IN))
    slot = host[0]
    counter = FlopCounter()
    bare = counter.forward(host, (N, IN))
    blueprint = Blueprint("low_rank", {"rank": 2})
    seed = build(blueprint, slot.contract, seed=1)
    seed_alone = count_flops(lambda: seed(torch.zeros(N, HIDDEN)))
    slot.germinate(blueprint)
    slot.graft(seed, "test-kernel")
    assert seed_alone > 0
    assert counter.forward(host, (N, IN)) == bare + seed_alone
    assert counter.forward(host, (N, IN), ablate=["0"]) == bare


def test_kernel_compile_estimate_is_positive_and_scales_with_the_validator_runs() -> None:
    contract = SlotContract.from_json({"shape": [HIDDEN], "dtype": "float32", "kind": "linear"})
    figures = kernel_compile_flops(Blueprint("low_rank", {"rank": 2}), contract)
    module = build(Blueprint("low_rank", {"rank": 2}), contract, seed=0)
    fwd_1 = count_flops(lambda: module(torch.zeros(1, HIDDEN)))
    assert figures["validation"] > 7 * fwd_1  # at b=1 alone: 2 fwd+bwd (≥ 2 fwd each) + 1 fwd
    assert figures["optimizer"] > figures["validation"]


def test_a_counterfactual_costs_the_full_validation_pass_whatever_else_drew_from_it() -> None:
    # A widening draws one validation batch after the full pass (GradMax's signal): the epoch's
    # counterfactual must still cost the ablated forward over the full pass, not over that batch.
    host = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))
    wrap(host, ["0"], example_input=torch.zeros(2, IN))
    blueprint = Blueprint("low_rank", {"rank": 2})
    host[0].germinate(blueprint)
    host[0].graft(build(blueprint, host[0].contract, seed=1), "test-kernel")
    ledger = FlopLedger(host)
    batches = [(torch.zeros(N, IN), torch.zeros(N, dtype=torch.long))] * 3
    val = ledger.val(batches)
    list(val)  # the full validation pass
    next(iter(val))  # a one-batch draw after it
    ablated = ledger.counter.forward(host, (N, IN), ablate=["0"])
    report = EpochReport(epoch=0, train_loss=None, val_loss=1.0,
                         counterfactual={"0": Counterfactual(1.0, 1.1, 0.5, 0.4)})
    ledger.end_epoch(report)
    assert ledger.totals["counterfactual"] == 3 * ablated
    assert ledger.totals["eval"] == 4 * ledger.counter.forward(host, (N, IN))
    ledger.end_epoch(report)  # a new epoch without validation passes has nothing to ablate
    assert ledger.totals["counterfactual"] == 3 * ablated
