"""Reading only regular files, bounded; writing never through a link (``esper_async._files``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from esper_async._files import (
    FileTooLarge,
    NotARegularFile,
    atomic_writer,
    open_append,
    open_regular,
    read_regular,
    write_atomic,
)


def test_a_regular_file_reads_whole_and_through_a_link(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"x" * 1000)
    link = tmp_path / "link"
    link.symlink_to(path)
    assert read_regular(path, cap=1000) == b"x" * 1000
    assert read_regular(link, cap=1000) == b"x" * 1000
    assert read_regular(tmp_path / "data", cap=10**6) == b"x" * 1000


def test_a_file_over_the_cap_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"x" * 1001)
    with pytest.raises(FileTooLarge, match="1001 bytes, over the cap of 1000"):
        read_regular(path, cap=1000)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_a_device_is_refused_before_any_read(tmp_path: Path, device: str) -> None:
    link = tmp_path / "ckpt-00000001.pt"
    link.symlink_to(device)
    for path in (device, link):
        with pytest.raises(NotARegularFile, match="a device, not a regular file"):
            read_regular(path, cap=2**40)  # a read of /dev/zero would never end
        with pytest.raises(NotARegularFile):
            open_regular(path)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: a plain open would block forever
    with pytest.raises(NotARegularFile, match="a FIFO"):
        read_regular(fifo, cap=10)
    with pytest.raises(NotARegularFile, match="a directory"):
        read_regular(tmp_path, cap=10)


def test_a_link_planted_at_the_temporary_name_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "trace.html"
    (tmp_path / "trace.html.tmp").symlink_to(victim)
    write_atomic(target, b"page")
    assert victim.read_bytes() == b"precious"
    assert target.read_bytes() == b"page" and not target.is_symlink()
    assert (tmp_path / "trace.html.tmp").is_symlink()  # left as found, not followed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.html", "trace.html.tmp", "victim"]


def test_a_link_at_the_target_is_replaced_not_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "out"
    target.symlink_to(victim)
    write_atomic(target, b"new")
    assert victim.read_bytes() == b"precious"
    assert not target.is_symlink() and target.read_bytes() == b"new"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_writer(target) as handle:
        handle.write(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_append_refuses_a_link_and_a_fifo(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "spans.jsonl").symlink_to(victim)
    with pytest.raises(OSError):
        open_append(tmp_path / "spans.jsonl")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError):
        open_append(tmp_path / "fifo")
    assert victim.read_text() == "precious"
    with open_append(tmp_path / "log") as handle:
        handle.write("one\n")
    with open_append(tmp_path / "log") as handle:
        handle.write("two\n")
    assert (tmp_path / "log").read_text() == "one\ntwo\n"
