"""Tests of the IntelligentSeedSelector: constraints, rewards, switching and persistence."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import esper_async.selection as selection
from esper_async.blueprints import Blueprint, SlotContract, build, library
from esper_async.errors import NoLegalArmError, SelectionError
from esper_async.selection import (
    ArmCost,
    IntelligentSeedSelector,
    SlotCandidate,
    estimate_cost,
    strategy_names,
)

CONTRACTS = (
    SlotContract("conv", (8, 4, 4)),
    SlotContract("conv", (16, 8, 8)),
    SlotContract("linear", (32,)),
    SlotContract("linear", (64,)),
)
BLUEPRINTS = library()


@functools.cache
def real_cost(blueprint: Blueprint, contract: SlotContract) -> ArmCost:
    """The selector's own estimate, cached across hypothesis examples to keep the tests fast."""
    return estimate_cost(blueprint, contract)


def _fits(bp: Blueprint, contract: SlotContract) -> bool:
    try:
        bp.check_fits(contract)
    except Exception:
        return False
    return True


def _candidates(n: int, *, live=(), embargoed=(), kinds=None) -> dict[str, SlotCandidate]:
    out = {}
    for i in range(n):
        contract = CONTRACTS[i % len(CONTRACTS)] if kinds is None else kinds[i]
        out[f"slot{i}"] = SlotCandidate(
            contract, i in live, i in embargoed, np.array([1.0, i / max(n, 1), 0.5])
        )
    return out


def test_module_all_matches_what_it_defines() -> None:
    assert all(hasattr(selection, name) for name in selection.__all__)
    public = {n for n in dir(selection) if not n.startswith("_")} - {"annotations"}
    assert public == set(selection.__all__)


def test_estimate_cost_counts_the_built_modules_parameters() -> None:
    contract = SlotContract("conv", (16, 8, 8))
    for bp in library("conv"):
        module = build(bp, contract, seed=0)
        params = sum(p.numel() for p in module.parameters())
        assert estimate_cost(bp, contract) == ArmCost(params, params * 4 * 4)


@st.composite
def situations(draw):
    n = draw(st.integers(1, 5))
    kinds = [draw(st.sampled_from(CONTRACTS)) for _ in range(n)]
    live = {i for i in range(n) if draw(st.booleans())}
    embargoed = {i for i in range(n) if draw(st.booleans())}
    bps = draw(st.lists(st.sampled_from(BLUEPRINTS), min_size=1, max_size=6, unique=True))
    max_live = draw(st.integers(1, 4))
    live_count = draw(st.integers(0, 4))
    param_budget = draw(st.one_of(st.none(), st.integers(0, 40_000)))
    memory_budget = draw(st.one_of(st.none(), st.integers(0, 600_000)))
    params_used = draw(st.integers(0, 20_000))
    memory_used = draw(st.integers(0, 300_000))
    return (
        _candidates(n, live=live, embargoed=embargoed, kinds=kinds),
        bps,
        max_live,
        live_count,
        param_budget,
        memory_budget,
        params_used,
        memory_used,
    )


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in strategy_names()])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    situation=situations(),
    seed=st.integers(0, 1000),
    rewards=st.lists(st.floats(-1, 1), max_size=5),
)
def test_choice_is_legal_or_no_legal_arm_is_raised(name, situation, seed, rewards) -> None:
    cands, bps, max_live, live_count, p_budget, m_budget, p_used, m_used = situation
    selector = IntelligentSeedSelector(
        name,
        max_live=max_live,
        param_budget=p_budget,
        memory_budget_bytes=m_budget,
        param_rent=1e-5,
        rng_seed=seed,
        cost_fn=real_cost,
    )

    def legal(slot: str, bp: Blueprint) -> bool:
        contract, live, embargoed, _ = cands[slot]
        if live or embargoed or live_count >= max_live or not _fits(bp, contract):
            return False
        cost = real_cost(bp, contract)
        return (p_budget is None or p_used + cost.params <= p_budget) and (
            m_budget is None or m_used + cost.memory_bytes <= m_budget
        )

    oracle = {(s, bp.id) for s in cands for bp in bps if legal(s, bp)}
    kwargs = dict(live_count=live_count, params_used=p_used, memory_used_bytes=m_used)
    event("some arm legal" if oracle else "no arm legal")
    for reward in [*rewards, None]:
        if not oracle:
            with pytest.raises(
                NoLegalArmError, match=r"no \(slot, blueprint\) pair is legal"
            ) as info:
                selector.choose(cands, bps, **kwargs)
            assert len(info.value.reasons) == len(cands) * len(bps)
            return
        slot, bp = selector.choose(cands, bps, **kwargs)
        assert (slot, bp.id) in oracle
        if reward is not None:
            selector.update(
                slot,
                bp,
                contribution=reward,
                param_count=10,
                health_features=cands[slot].health_features,
            )


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        pytest.param(dict(live_count=2), "2 seeds live, max_live is 2", id="max-live"),
        pytest.param(dict(live=(0, 1)), "the slot already has a live seed", id="live"),
        pytest.param(dict(embargoed=(0, 1)), "embargoed after a cull", id="embargo"),
        pytest.param(dict(param_budget=10), "parameters, 10 left in budget", id="param-budget"),
        pytest.param(dict(memory_budget=10), "bytes, 10 left in memory budget", id="memory-budget"),
    ],
)
def test_every_ruled_out_pair_has_its_reason(setup: dict, reason: str) -> None:
    selector = IntelligentSeedSelector(
        max_live=2,
        param_budget=setup.get("param_budget"),
        memory_budget_bytes=setup.get("memory_budget"),
    )
    conv = SlotContract("conv", (8, 4, 4))
    cands = _candidates(
        2, live=setup.get("live", ()), embargoed=setup.get("embargoed", ()), kinds=[conv, conv]
    )
    bps = library("conv")
    with pytest.raises(NoLegalArmError) as info:
        selector.choose(cands, bps, live_count=setup.get("live_count", 0))
    assert set(info.value.reasons) == {f"slot{i}/{bp.id}" for i in range(2) for bp in bps}
    assert all(reason in r for r in info.value.reasons.values())


def test_blueprints_of_the_wrong_kind_are_never_chosen() -> None:
    selector = IntelligentSeedSelector("softmax", max_live=4, rng_seed=1)
    cands = _candidates(1, kinds=[SlotContract("linear", (32,))])
    chosen = {selector.choose(cands, library(), live_count=0)[1] for _ in range(200)}
    assert chosen and all(bp.slot_kind.value == "linear" for bp in chosen)
    with pytest.raises(NoLegalArmError, match="does not fit the slot"):
        selector.choose(cands, library("conv"), live_count=0)


def test_reward_charges_rent_per_parameter() -> None:
    selector = IntelligentSeedSelector(max_live=1, param_rent=1e-4)
    assert selector.reward("s", "bp-1", 0.5, 1000) == pytest.approx(0.4)
    with pytest.raises(SelectionError, match="finite"):
        selector.reward("s", "bp-1", float("nan"), 10)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(max_live=0), id="max-live-0"),
        pytest.param(dict(max_live=1, param_rent=-1.0), id="negative-rent"),
        pytest.param(dict(max_live=1, param_budget=-5), id="negative-budget"),
    ],
)
def test_bad_limits_are_refused(kwargs: dict) -> None:
    with pytest.raises(SelectionError):
        IntelligentSeedSelector(**kwargs)


def test_unknown_strategy_name_lists_the_valid_ones() -> None:
    selector = IntelligentSeedSelector(max_live=1)
    with pytest.raises(SelectionError, match=r"valid names are: .*epsilon_greedy"):
        selector.set_strategy("greedy")


def _learn(selector: IntelligentSeedSelector, cands, bps, good_slot: str, rounds: int) -> None:
    for _ in range(rounds):
        slot, bp = selector.choose(cands, bps, live_count=0)
        selector.update(
            slot,
            bp,
            contribution=1.0 if slot == good_slot else 0.0,
            param_count=0,
            health_features=cands[slot].health_features,
        )


def test_switching_strategy_replays_what_was_learned() -> None:
    cands = _candidates(4, kinds=[SlotContract("linear", (32,))] * 4)
    bps = library("linear")[:2]
    selector = IntelligentSeedSelector("ucb1", max_live=3)
    _learn(selector, cands, bps, "slot3", rounds=60)
    selector.set_strategy("epsilon_greedy", epsilon=0.0)
    assert selector.choose(cands, bps, live_count=0)[0] == "slot3"
    selector.set_strategy("epsilon_greedy", replay=False, epsilon=0.0)
    assert selector.choose(cands, bps, live_count=0)[0] == "slot0"  # knows nothing: first arm


def test_selector_state_round_trip_continues_identically() -> None:
    cands = _candidates(4)
    selector = IntelligentSeedSelector("thompson_gaussian", max_live=3, rng_seed=5)
    _learn(selector, cands, BLUEPRINTS, "slot2", rounds=30)
    restored = IntelligentSeedSelector("ucb1", max_live=3)
    restored.load_state_dict(json.loads(json.dumps(selector.state_dict())))
    assert restored.strategy.name == "thompson_gaussian"
    for _ in range(20):
        a = selector.choose(cands, BLUEPRINTS, live_count=0)
        b = restored.choose(cands, BLUEPRINTS, live_count=0)
        assert a == b
        for sel in (selector, restored):
            sel.update(a[0], a[1], contribution=0.3, param_count=5)


def test_linucb_reads_slot_health_features() -> None:
    """Growth pays only where the first health feature is high; LinUCB must learn that."""
    linear = SlotContract("linear", (32,))
    bps = library("linear")[:1]
    rng = np.random.default_rng(0)
    selector = IntelligentSeedSelector("linucb", max_live=2, rng_seed=0)
    hits = []
    for t in range(300):
        needy = int(rng.integers(3))
        cands = {
            f"slot{i}": SlotCandidate(linear, False, False, np.array([float(i == needy), 1.0]))
            for i in range(3)
        }
        slot, bp = selector.choose(cands, bps, live_count=0)
        selector.update(
            slot,
            bp,
            contribution=float(slot == f"slot{needy}"),
            param_count=0,
            health_features=cands[slot].health_features,
        )
        if t >= 200:
            hits.append(slot == f"slot{needy}")
    assert np.mean(hits) > 0.9


def test_no_legal_arm_is_logged_once_per_change() -> None:
    from structlog.testing import capture_logs

    selector = IntelligentSeedSelector(max_live=1, rng_seed=0)
    cands = _candidates(2, kinds=[SlotContract("linear", (32,))] * 2)
    with capture_logs() as logs:
        for live_count in (1, 1, 1, 0, 1, 1):  # full thrice, one choice, full again twice
            try:
                selector.choose(cands, library(), live_count=live_count)
            except NoLegalArmError:
                pass
    ruled_out = [e for e in logs if e["event"] == "no legal seed arm"]
    assert len(ruled_out) == 2 and ruled_out[0]["log_level"] == "info"
