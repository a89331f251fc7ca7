"""Blueprints: declarative seed designs, their registry, the standard library and ``build``."""

from . import _transformer as _transformer  # registers the token-slot families
from ._build import build as build
from ._contract import SlotContract as SlotContract
from ._contract import SlotKind as SlotKind
from ._families import Family as Family
from ._families import Option as Option
from ._families import _LowRank as LowRank
from ._families import families as families
from ._families import get_family as get_family
from ._families import register_family as register_family
from ._ir import Blueprint as Blueprint
from ._library import library as library

__all__ = (
    "Blueprint",
    "Family",
    "LowRank",
    "Option",
    "SlotContract",
    "SlotKind",
    "build",
    "families",
    "get_family",
    "library",
    "register_family",
)
