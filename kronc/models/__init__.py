"""Model definitions ported into plain PyTorch so that kronc can trace and rewrite them."""

from kronc.models.textgenrnn import TextGenRNN

__all__ = ["TextGenRNN"]
