"""Width growth of a transformer's residual stream (``d_model``), function-preserving at birth.

:class:`WidenResidual` grows the stream from ``d`` to ``d'`` (see the class for the rules).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SurgeryError
from ._context import SurgeryContext

__all__ = ("WidenResidual",)


@dataclass(frozen=True)
class WidenResidual:
    """Widen a transformer's residual stream (``d_model``) to ``width``, preserving its function.

    The coupled layers are found from the model's torch.fx graph: the stream starts at the
    embeddings (and learned position tables) whose output feeds it, runs through residual
    additions, LayerNorm/RMSNorm and dropout, and is read by Linear layers (attention's
    projections, the MLP's input projections, gated or not, the output head, tied or not) and
    written by the Linear layers whose outputs are added back to it. Attention whose inner width
    follows the stream (its code reads ``d`` from the input's shape) gains heads of the same head
    size. Anything else on the stream raises :class:`GrowthCouplingError`.

    :param width: the new residual width ``d'`` (larger than the current one; for attention that
        follows the stream, a multiple of its head size).
    :param seed: seeds the new weights (reproducible surgery and replay).
    :param embedding: dotted name of the embedding that starts the stream (default: the first
        ``nn.Embedding`` the model calls).
    :param head_dim: attention's head size (default: read from the graph).
    """

    width: int
    seed: int = 0
    embedding: str | None = None
    head_dim: int | None = None

    @property
    def preserves_function(self) -> bool:
        return True

    def describe(self) -> str:
        return f"widen the residual stream to {self.width}"

    def apply(self, ctx: SurgeryContext) -> None:
        operation = self.describe()
        raise SurgeryError(f"{operation}: not implemented yet", operation=operation)
