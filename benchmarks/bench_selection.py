"""Seed selection: decision latency, and cumulative regret against MABWiser on the same problems.

    python benchmarks/bench_selection.py [--quick] [--seeds N] [--jobs N]
        → benchmarks/results/selection.json

Latency: ``IntelligentSeedSelector.choose`` end to end (constraint filtering and the strategy's
decision) with 8, 64 and 1,024 arms (1, 8 and 128 conv slots times 8 blueprints), each decision
followed by an (untimed) reward update, as in a run. Two offer patterns: ``steady`` (the same slots
are free at every decision) and ``churn`` (one slot changes embargo state before every decision,
so the set of legal arms is new each time). The headline ``decide_p99_us_64`` is UCB1 under churn,
the harder of the two. ``strategy.select`` alone is timed too. The garbage collector is paused
while timing, as ``timeit`` does.

Regret: pseudo-regret ``Σ_t (max_a μ_t(a) - μ_t(a_t))`` over 10,000 rounds (--seeds, 10) on a
Bernoulli and a Gaussian 10-armed problem, a switching-means Bernoulli problem (5 arms, means
redrawn every 2,000 rounds) and, for LinUCB, a linear contextual problem. Rewards are drawn once
per (round, arm) from the problem's seed, so our strategy and MABWiser's counterpart see the very
same reward for the same pull. Both start with one pull of each arm. ``regret_ratio_vs_mabwiser``
is ours / theirs, summed over problems and seeds, with a bootstrap 95 % interval over the paired
runs; 1.05 is the bar only where ``same_algorithm`` is true. ``--jobs N`` spreads the regret runs
over N worker processes (the figures do not depend on N).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, write
from mabwiser.mab import MAB, LearningPolicy

from esper_async.blueprints import Blueprint, SlotContract, library
from esper_async.selection import (
    UCB1,
    DiscountedUCB,
    EpsilonGreedy,
    IntelligentSeedSelector,
    LinUCB,
    SlidingWindowUCB,
    SlotCandidate,
    Softmax,
    Strategy,
    ThompsonBeta,
    ThompsonGaussian,
    strategy_names,
)

#: The goal for one decision at 64 arms (issue 6).
GOAL_P99_US_64 = 50.0
#: Where the algorithm is the same as MABWiser's, ours may have at most this much more regret.
GOAL_RATIO = 1.05


# -- latency ------------------------------------------------------------------------------------


def _blueprints() -> list[Blueprint]:
    # The 7 standard conv designs and one more variant: 8 blueprints per conv slot.
    return [*library("conv"), Blueprint("residual_conv", {"kernel_size": 5, "expansion": 1})]


def _latency(name: str, n_slots: int, decisions: int, churn: bool) -> dict[str, float]:
    rng = np.random.default_rng(0)
    contract = SlotContract("conv", (16, 8, 8))
    bps = _blueprints()
    cands = {
        f"block{i}": SlotCandidate(contract, False, False, rng.random(6)) for i in range(n_slots)
    }
    names = list(cands)
    selector = IntelligentSeedSelector(
        name, max_live=4, param_budget=10**7, memory_budget_bytes=10**9, param_rent=1e-6
    )
    choose_ns: list[int] = []
    select_ns: list[int] = []
    warmup = min(200, decisions)
    gc.disable()
    try:
        for i in range(decisions + warmup):
            if churn and n_slots > 1:
                # block0 stays free, so some arm is always legal.
                slot = names[1 + int(rng.integers(n_slots - 1))]
                cands[slot] = cands[slot]._replace(embargoed=not cands[slot].embargoed)
            start = time.perf_counter_ns()
            slot, bp = selector.choose(cands, bps, live_count=1)
            took = time.perf_counter_ns() - start
            if i >= warmup:
                choose_ns.append(took)
            selector.update(
                slot,
                bp,
                contribution=float(rng.normal(0.01, 0.02)),
                param_count=1000,
                health_features=cands[slot].health_features,
            )
        # The strategy alone, on the full set of arms (a fixed tuple, as a steady run offers).
        arms, slots, counts = selector.legal_arms(
            {k: v._replace(embargoed=False) for k, v in cands.items()}, bps, live_count=0
        )
        context = np.repeat(np.stack([cands[s].health_features for s in slots]), counts, axis=0)
        for _ in range(decisions):
            start = time.perf_counter_ns()
            selector.strategy.select(arms, context)
            select_ns.append(time.perf_counter_ns() - start)
    finally:
        gc.enable()
    c, s = np.array(choose_ns) / 1e3, np.array(select_ns) / 1e3
    return {
        "choose_p50_us": round(float(np.percentile(c, 50)), 2),
        "choose_p99_us": round(float(np.percentile(c, 99)), 2),
        "select_p50_us": round(float(np.percentile(s, 50)), 2),
        "select_p99_us": round(float(np.percentile(s, 99)), 2),
    }


# -- regret -------------------------------------------------------------------------------------


@dataclass
class Problem:
    name: str
    means: np.ndarray  # (rounds, K): expected reward of each arm at each round
    rewards: np.ndarray  # (rounds, K): the reward a pull of that arm at that round returns
    contexts: np.ndarray  # (rounds, d): the context shown at each round
    binary: bool


def make_problem(name: str, seed: int, rounds: int) -> Problem:
    rng = np.random.default_rng(seed)
    ones = np.ones((rounds, 1))
    if name == "bernoulli":
        mu = rng.uniform(0.05, 0.95, size=10)
        means = np.broadcast_to(mu, (rounds, 10)).copy()
        rewards = (rng.random((rounds, 10)) < means).astype(float)
        return Problem(name, means, rewards, ones, True)
    if name == "gaussian":
        mu = rng.normal(0.0, 1.0, size=10)
        means = np.broadcast_to(mu, (rounds, 10)).copy()
        return Problem(name, means, means + rng.normal(0.0, 1.0, (rounds, 10)), ones, False)
    if name == "switching":
        segment = 2000
        means = np.concatenate(
            [
                np.broadcast_to(rng.uniform(0.05, 0.95, size=5), (segment, 5))
                for _ in range(-(-rounds // segment))
            ]
        )[:rounds]
        rewards = (rng.random((rounds, 5)) < means).astype(float)
        return Problem(name, means, rewards, ones, True)
    if name == "contextual_linear":
        d, k = 4, 5
        theta = rng.normal(0.0, 1.0, (k, d)) / np.sqrt(d)
        x = rng.normal(0.0, 1.0, (rounds, d))
        means = x @ theta.T
        return Problem(name, means, means + rng.normal(0.0, 0.5, (rounds, k)), x, False)
    raise ValueError(name)


def run_ours(strategy: Strategy, p: Problem) -> float:
    k = p.means.shape[1]
    arms = tuple(("slot", f"a{i}") for i in range(k))
    index = {a: i for i, a in enumerate(arms)}
    picks = np.empty(len(p.means), dtype=int)
    for t in range(len(p.means)):
        x = p.contexts[t]
        i = t if t < k else index[strategy.select(arms, np.broadcast_to(x, (k, x.shape[0])))]
        picks[t] = i
        strategy.update(arms[i], float(p.rewards[t, i]), x)
    return _regret(p, picks)


def run_mabwiser(policy: Any, p: Problem, seed: int) -> float:
    k = p.means.shape[1]
    arms = list(range(k))
    contextual = isinstance(policy, LearningPolicy.LinUCB)
    mab = MAB(arms, policy, seed=seed)
    picks = np.empty(len(p.means), dtype=int)
    picks[:k] = arms
    warm = p.rewards[np.arange(k), arms]
    if contextual:
        mab.fit(arms, warm, p.contexts[:k])
    else:
        mab.fit(arms, warm)
    for t in range(k, len(p.means)):
        x = p.contexts[t : t + 1]
        i = int(mab.predict(x) if contextual else mab.predict())
        picks[t] = i
        if contextual:
            mab.partial_fit([i], [p.rewards[t, i]], x)
        else:
            mab.partial_fit([i], [p.rewards[t, i]])
    return _regret(p, picks)


def _regret(p: Problem, picks: np.ndarray) -> float:
    chosen = p.means[np.arange(len(picks)), picks]
    return float((p.means.max(axis=1) - chosen).sum())


def _binarise(arm: Any, reward: float) -> bool:
    return reward > 0.0


@dataclass
class Contender:
    ours: Callable[[Problem, int], Strategy]
    theirs: Callable[[Problem], Any]
    counterpart: str
    same_algorithm: bool
    problems: tuple[str, ...] = ("bernoulli", "gaussian", "switching")
    note: str = ""


def _thompson(p: Problem) -> Any:
    return LearningPolicy.ThompsonSampling(None if p.binary else _binarise)


CONTENDERS: dict[str, Contender] = {
    "ucb1": Contender(
        lambda p, s: UCB1(c=1.0, seed=s),
        lambda p: LearningPolicy.UCB1(alpha=1.0),
        "UCB1(alpha=1)",
        True,
    ),
    "discounted_ucb": Contender(
        lambda p, s: DiscountedUCB(gamma=0.998, c=0.3, seed=s),
        lambda p: LearningPolicy.UCB1(alpha=1.0),
        "UCB1(alpha=1)",
        False,
        note="MABWiser has no discounted UCB; its plain UCB1 is the nearest reference. gamma and "
        "c were picked on seeds 0-7, disjoint from the benchmark's seeds",
    ),
    "sliding_window_ucb": Contender(
        lambda p, s: SlidingWindowUCB(window=1000, c=0.3, seed=s),
        lambda p: LearningPolicy.UCB1(alpha=1.0),
        "UCB1(alpha=1)",
        False,
        note="MABWiser has no sliding-window UCB; its plain UCB1 is the nearest reference. "
        "window and c were picked on seeds 0-7, disjoint from the benchmark's seeds",
    ),
    "thompson_beta": Contender(
        lambda p, s: ThompsonBeta(threshold=None if p.binary else 0.0, seed=s),
        _thompson,
        "ThompsonSampling (binarizer reward > 0 on Gaussian rewards)",
        True,
    ),
    "thompson_gaussian": Contender(
        lambda p, s: ThompsonGaussian(noise_var=0.25 if p.binary else 1.0, seed=s),
        _thompson,
        "ThompsonSampling (Beta; binarizer reward > 0 on Gaussian rewards)",
        False,
        note="MABWiser's Thompson sampling is Beta/Bernoulli only",
    ),
    "epsilon_greedy": Contender(
        lambda p, s: EpsilonGreedy(epsilon=0.1, seed=s),
        lambda p: LearningPolicy.EpsilonGreedy(epsilon=0.1),
        "EpsilonGreedy(epsilon=0.1)",
        True,
    ),
    "epsilon_greedy_decay": Contender(
        lambda p, s: EpsilonGreedy(epsilon=1.0, decay=0.999, min_epsilon=0.01, seed=s),
        lambda p: LearningPolicy.EpsilonGreedy(epsilon=0.1),
        "EpsilonGreedy(epsilon=0.1)",
        False,
        note="MABWiser has no decaying epsilon; fixed 0.1 is the reference",
    ),
    "softmax": Contender(
        lambda p, s: Softmax(tau=0.1, seed=s),
        lambda p: LearningPolicy.Softmax(tau=0.1),
        "Softmax(tau=0.1)",
        False,
        note="same Boltzmann weights, but MABWiser plays the argmax of a Dirichlet draw over "
        "them rather than sampling the Boltzmann distribution",
    ),
    "linucb": Contender(
        lambda p, s: LinUCB(alpha=1.0, l2_lambda=1.0, seed=s),
        lambda p: LearningPolicy.LinUCB(alpha=1.0, l2_lambda=1.0),
        "LinUCB(alpha=1, l2_lambda=1)",
        True,
        problems=("bernoulli", "gaussian", "switching", "contextual_linear"),
        note="a constant context [1] on the non-contextual problems",
    ),
}


def _one_run(task: tuple[str, str, str, int, int]) -> float:
    """One regret run: ``(side, contender, problem, seed, rounds)``; a process-pool task."""
    side, name, prob, seed, rounds = task
    c = CONTENDERS[name]
    p = make_problem(prob, seed, rounds)
    if side == "ours":
        return run_ours(c.ours(p, seed), p)
    return run_mabwiser(c.theirs(p), p, seed)


def _bootstrap_ci(ours: np.ndarray, theirs: np.ndarray, rng: np.random.Generator) -> list[float]:
    """95 % interval of sum(ours) / sum(theirs), resampling the paired runs."""
    idx = rng.integers(len(ours), size=(2000, len(ours)))
    ratios = ours[idx].sum(axis=1) / theirs[idx].sum(axis=1)
    return [round(float(q), 4) for q in np.percentile(ratios, [2.5, 97.5])]


def _regret_table(rounds: int, seeds: list[int], jobs: int) -> dict[str, Any]:
    tasks: list[tuple[str, str, str, int, int]] = []
    theirs_key: dict[tuple[str, str, int], tuple[str, str, str, int, int]] = {}
    for name, c in CONTENDERS.items():
        for prob in c.problems:
            for seed in seeds:
                tasks.append(("ours", name, prob, seed, rounds))
                # One MABWiser run serves every contender with the same counterpart.
                key = (c.counterpart, prob, seed)
                if key not in theirs_key:
                    theirs_key[key] = ("theirs", name, prob, seed, rounds)
                    tasks.append(theirs_key[key])
    if jobs > 1:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds torch
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            values = list(pool.map(_one_run, tasks, chunksize=1))
    else:
        values = [_one_run(t) for t in tasks]
    done = dict(zip(tasks, values, strict=True))

    rng = np.random.default_rng(0)
    per_problem: dict[str, dict[str, Any]] = {}
    ratios: dict[str, float] = {}
    intervals: dict[str, list[float]] = {}
    for name, c in CONTENDERS.items():
        all_ours, all_theirs = [], []
        for prob in c.problems:
            ours = np.array([done[("ours", name, prob, s, rounds)] for s in seeds])
            theirs = np.array([done[theirs_key[(c.counterpart, prob, s)]] for s in seeds])
            all_ours.append(ours)
            all_theirs.append(theirs)
            per_problem.setdefault(prob, {})[name] = {
                "ours_mean": round(float(ours.mean()), 2),
                "mabwiser_mean": round(float(theirs.mean()), 2),
                "ratio": round(float(ours.sum() / theirs.sum()), 4),
            }
            print(
                f"  regret {prob:18s} {name:22s} ours {ours.mean():9.1f}  "
                f"mabwiser {theirs.mean():9.1f}",
                flush=True,
            )
        o, t = np.concatenate(all_ours), np.concatenate(all_theirs)
        ratios[name] = round(float(o.sum() / t.sum()), 4)
        intervals[name] = _bootstrap_ci(o, t, rng)
    return {"per_problem": per_problem, "ratios": ratios, "ci95": intervals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes: runs in seconds")
    parser.add_argument(
        "--jobs", type=int, default=1, help="worker processes for the regret runs (default 1)"
    )
    parser.add_argument(
        "--seeds", type=int, default=10, help="problem seeds for the regret runs (default 10)"
    )
    args = parser.parse_args()
    rounds = 1000 if args.quick else 10_000
    # Seeds 0-7 were used to pick the non-stationary strategies' parameters: keep them out.
    seeds = list(range(1000, 1000 + (2 if args.quick else args.seeds)))
    # The machine may be shared: the load average says how much else ran beside the timings.
    load_before = [round(v, 2) for v in os.getloadavg()]
    decisions = 300 if args.quick else 3000

    latency: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for pattern in ("steady", "churn"):
        for name in strategy_names():
            for n_slots in (1, 8, 128):
                arms = n_slots * len(_blueprints())
                figures = _latency(name, n_slots, decisions, churn=pattern == "churn")
                latency.setdefault(pattern, {}).setdefault(name, {})[str(arms)] = figures
                print(f"  latency {pattern:6s} {name:20s} {arms:5d} arms {figures}", flush=True)

    regret = _regret_table(rounds, seeds, args.jobs)
    ucb_churn = latency["churn"]["ucb1"]
    worst_64 = max(latency["churn"][n]["64"]["choose_p99_us"] for n in strategy_names())
    same = {n: c.same_algorithm for n, c in CONTENDERS.items()}
    result: dict[str, Any] = {
        "machine": machine(),
        "quick": args.quick,
        "command": "python benchmarks/bench_selection.py "
        + ("--quick " if args.quick else f"--seeds {args.seeds} ")
        + f"--jobs {args.jobs}",
        "decide_p99_us_64": ucb_churn["64"]["choose_p99_us"],
        "decide_p50_us_64": ucb_churn["64"]["choose_p50_us"],
        **{
            f"decide_p{q}_us_{n}": ucb_churn[n][f"choose_p{q}_us"]
            for q in (50, 99)
            for n in ("8", "1024")
        },
        "decide_p99_us_64_worst_strategy": worst_64,
        "goal_p99_us_64": GOAL_P99_US_64,
        "meets_latency_goal": ucb_churn["64"]["choose_p99_us"] < GOAL_P99_US_64,
        "latency_us": latency,
        "rounds": rounds,
        "seeds": seeds,
        "regret_ratio_vs_mabwiser": regret["ratios"],
        "regret_ratio_ci95": regret["ci95"],
        "same_algorithm": same,
        "meets_ratio_goal": {n: regret["ratios"][n] <= GOAL_RATIO for n, s in same.items() if s},
        "mabwiser_counterpart": {n: c.counterpart for n, c in CONTENDERS.items()},
        "notes": {n: c.note for n, c in CONTENDERS.items() if c.note},
        "regret": regret["per_problem"],
    }
    result["machine"]["mabwiser"] = importlib.metadata.version("mabwiser")
    result["machine"]["numpy"] = np.__version__
    result["machine"]["load_average_1_5_15_before_timing"] = load_before
    path = write("selection", result)
    print(f"wrote {path}")
    print(f"decide_p99_us_64 = {result['decide_p99_us_64']} (goal < {GOAL_P99_US_64})")
    for n, r in regret["ratios"].items():
        tag = "  (same algorithm)" if same[n] else ""
        print(f"regret_ratio_vs_mabwiser[{n}] = {r}  ci95 {regret['ci95'][n]}{tag}")


if __name__ == "__main__":
    main()
