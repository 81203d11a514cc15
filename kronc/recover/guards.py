"""Checks that fail early with a clear `RecoveryError`, and contexts that leave the models as they were."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from ..modules import CompressedEmbedding
from .batches import TokenWindows
from .config import RecoveryConfig, RecoveryError

HOOKS = ("attach", "before_step", "penalty", "after_backward", "after_step", "finish", "metrics", "state_dict",
         "load_state_dict")


def check_models(student: Any, teacher: Any) -> None:
    for who, m in (("student", student), ("teacher", teacher)):
        if not isinstance(m, nn.Module):
            raise RecoveryError(f"the {who} must be an nn.Module, got {type(m).__name__}")
    if student is teacher:
        raise RecoveryError("the teacher is the student: pass the dense model as teacher and the compressed copy "
                            "kronc.compile returned as student")
    teacher_storage = {p.untyped_storage().data_ptr() for p in teacher.parameters() if p.numel()}
    shared = [n for n, p in student.named_parameters() if p.numel() and p.untyped_storage().data_ptr() in teacher_storage]
    if shared:
        raise RecoveryError(f"the student shares parameter {shared[0]!r} (and {len(shared) - 1} more) with the teacher; "
                            "training would change the teacher: compress a copy (kronc.compile without inplace=True)")


def check_schemes(schemes: Sequence[Any]) -> tuple[list[Any], list[str]]:
    """The schemes as a list, and unique names for them (``name``, then ``name#2``... when repeated)."""
    out = list(schemes)
    names: list[str] = []
    for i, s in enumerate(out):
        missing = [h for h in HOOKS if not callable(getattr(s, h, None))]
        if missing:
            raise RecoveryError(f"schemes[{i}] ({type(s).__name__}) is not a kronc.recover.Scheme: it has no "
                                f"{', '.join(missing)}")
        name = str(getattr(s, "name", type(s).__name__))
        names.append(name if name not in names else f"{name}#{names.count(name) + 1}")
    return out, names


def check_windows(model: nn.Module, windows: TokenWindows, config: RecoveryConfig) -> None:
    """Token ids inside the vocabulary and windows no longer than the model's positions."""
    hf = getattr(model, "config", None)
    positions = getattr(hf, "n_positions", None) or getattr(hf, "max_position_embeddings", None)
    if isinstance(positions, int) and config.seq_len > positions:
        raise RecoveryError(f"seq_len {config.seq_len} is longer than the model's {positions} positions: lower seq_len")
    vocab = vocab_size(model)
    top = int(windows.ids.max())
    if vocab is not None and top >= vocab:
        raise RecoveryError(f"the training data has token id {top} but the model's vocabulary has {vocab} entries: "
                            "tokenize with the model's own tokenizer")


def vocab_size(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        emb = next((m for m in model.modules() if isinstance(m, (nn.Embedding, CompressedEmbedding))), None)
    n = getattr(emb, "num_embeddings", None)
    return int(n) if isinstance(n, int) else None


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch, Python and numpy; put the caller's RNG states back afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextmanager
def models_restored(student: nn.Module, teacher: nn.Module) -> Iterator[None]:
    """Put back every module's training flag and the student's ``requires_grad`` flags on exit (by name: a
    sharded run hands the student back with new parameter objects)."""
    modes = [(m, m.training) for model in (student, teacher) for m in model.modules()]
    grads = {name: p.requires_grad for name, p in student.named_parameters()}
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for name, p in student.named_parameters():
            if name in grads:
                p.requires_grad_(grads[name])


def device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
