"""esper_async: asyncio-native morphogenetic training for PyTorch."""

from ._exceptions import *  # noqa: F403
