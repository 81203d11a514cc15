"""Text to token ids: the one place that knows the shapes tokenizers return (used by recovery and the tools)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


def token_ids(tokenizer_or_ids: Any, text: str | None) -> Tensor:
    """A 1-D long tensor of token ids: ``tokenizer_or_ids`` is ids already (tensor, array, sequence) or a
    tokenizer (``encode`` or callable; Hugging Face and `tokenizers` outputs are unwrapped) applied to ``text``."""
    if isinstance(tokenizer_or_ids, Tensor):
        return tokenizer_or_ids.reshape(-1).long()
    if isinstance(tokenizer_or_ids, np.ndarray):
        return torch.from_numpy(tokenizer_or_ids.reshape(-1)).long()
    if isinstance(tokenizer_or_ids, Sequence) and not isinstance(tokenizer_or_ids, str):
        return torch.tensor(list(tokenizer_or_ids), dtype=torch.long)
    if text is None:
        raise ValueError("text is required when a tokenizer is given")
    tokenizer = tokenizer_or_ids
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):
        try:
            ids = encode(text, add_special_tokens=False)
        except TypeError:
            ids = encode(text)
    else:
        ids = tokenizer(text)
    ids = getattr(ids, "ids", ids)  # a `tokenizers.Encoding`
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)
