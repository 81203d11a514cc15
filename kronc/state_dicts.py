"""State dicts as saved: tied tensors once, no shared storage, and the bytes a model really stores."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def dedupe(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Tied tensors once, under their first name."""
    aliases = alias_map(state)
    return {k: v for k, v in state.items() if k not in aliases}


def alias_map(state: dict[str, Tensor]) -> dict[str, str]:
    """Names of tensors that are the same tensor as an earlier entry (same storage, offset, shape, dtype)."""
    first: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    aliases = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def unshared(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors, none sharing memory (safetensors refuses shared storage)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def stored_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor in ``model``'s state dict (tied tensors counted once)."""
    return sum(t.numel() * t.element_size() for t in dedupe(model.state_dict()).values())
