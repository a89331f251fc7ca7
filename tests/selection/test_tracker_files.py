"""The tracker's state file is never written through a planted link, and loading refuses a FIFO
or a device before reading it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from esper_async.errors import SelectionError
from esper_async.selection import PerformanceTracker


def test_saving_does_not_follow_a_link_at_the_temporary_name(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "selection_tracker.json"
    (tmp_path / "selection_tracker.json.tmp").symlink_to(victim)
    PerformanceTracker(window=3).save(target)
    assert victim.read_text() == "precious"
    assert not target.is_symlink() and PerformanceTracker.load(target).window == 3


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_loading_refuses_what_is_not_a_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "selection_tracker.json"
    if kind == "fifo":
        os.mkfifo(path)  # no writer: a plain read blocks forever
    else:
        path.symlink_to("/dev/zero")
    with pytest.raises(SelectionError, match="not a regular file"):
        PerformanceTracker.load(path)
