"""Model definitions ported into plain PyTorch so that kronc can trace and rewrite them."""

from .textgenrnn import TextGenRNN

__all__ = ["TextGenRNN"]
