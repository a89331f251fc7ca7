"""Epoch reports to JSON and back, for checkpoints."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..seeds import HealthSignals
from ._controller import Counterfactual, EpochReport

__all__ = ("report_from_json", "report_to_json")


def report_to_json(report: EpochReport) -> dict[str, Any]:
    """``report`` as JSON-ready data (non-finite floats stay floats: JSON writes them as NaN)."""
    return {
        "epoch": report.epoch, "train_loss": report.train_loss, "val_loss": report.val_loss,
        "val_acc": report.val_acc,
        "health": {k: dataclasses.asdict(v) for k, v in report.health.items()},
        "counterfactual": {k: dataclasses.asdict(v) for k, v in report.counterfactual.items()},
        "steps": report.steps, "dropped": report.dropped, "metrics": dict(report.metrics),
        "width_counterfactual": {
            k: dataclasses.asdict(v) for k, v in report.width_counterfactual.items()
        },
        "eval_cost": dict(report.eval_cost),
    }


def report_from_json(data: dict[str, Any]) -> EpochReport:
    """The inverse of :func:`report_to_json` (a report written before ``steps``, ``dropped``,
    ``metrics`` and ``eval_cost`` were recorded reads back with 0, 0, ``{}`` and ``{}``)."""
    train_loss = data["train_loss"]
    return EpochReport(
        epoch=int(data["epoch"]), train_loss=None if train_loss is None else float(train_loss),
        val_loss=float(data["val_loss"]), val_acc=float(data["val_acc"]),
        health={k: HealthSignals(**v) for k, v in data["health"].items()},
        counterfactual={k: Counterfactual(**v) for k, v in data["counterfactual"].items()},
        steps=int(data.get("steps", 0)), dropped=int(data.get("dropped", 0)),
        metrics={str(k): float(v) for k, v in data.get("metrics", {}).items()},
        width_counterfactual={
            k: Counterfactual(**v) for k, v in data.get("width_counterfactual", {}).items()
        },
        eval_cost={str(k): float(v) for k, v in data.get("eval_cost", {}).items()},
    )
