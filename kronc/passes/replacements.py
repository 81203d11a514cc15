"""Build the compressed module that replaces one use of a site."""

from __future__ import annotations

from torch import Tensor, nn

from ..formats import Factorized
from ..modules import CompressedEmbedding, CompressedLinear, CompressedLSTM


def replacement_for_module(module: nn.Module, role: str, weights: dict[str, Factorized]) -> nn.Module:
    """The compressed stand-in for a Linear/Conv1D/Embedding/LSTM module.

    ``weights`` maps the module's weight attribute names (``weight``, ``weight_ih_l0``, ...) to
    their compressed formats.
    """
    if role == "lstm":
        assert isinstance(module, nn.LSTM)
        return CompressedLSTM(module, weights)
    fmt = weights["weight"]
    if role == "embedding":
        assert isinstance(module, nn.Embedding)
        if module.max_norm is not None:
            raise ValueError("kronc cannot compress an nn.Embedding with max_norm (it rescales stored rows)")
        return CompressedEmbedding(fmt, module.padding_idx)
    bias: Tensor | None = getattr(module, "bias", None)
    return CompressedLinear(fmt, bias)
