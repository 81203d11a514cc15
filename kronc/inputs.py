"""Checks of what the user hands `kronc.compile` / `kronc.plan`, done before any work starts.

A bad batch, a NaN weight or a model on the meta device would otherwise surface minutes later as a
raw torch or transformers error deep inside the model (or, for NaN weights, as an eigensolver that
"failed to converge"). Each check raises `InputError`: one line naming the argument (``calibration[3]``,
``example_inputs``, ``model``) or the site.

Calibration batches are tensors of token ids ``(batch, seq)``, tuples of positional tensors, or
mappings of keyword inputs. A 2-D tensor of ids given as the whole ``calibration`` is that many
one-row batches (as `kronc.recover` reads it); a 1-D tensor of ids inside the list is one row.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .sites import Site


class InputError(ValueError):
    """A model, weight, calibration batch or example input kronc cannot use; the message names it."""


def check_model(model: Any) -> None:
    """``model`` must be an `nn.Module` with real (not meta-device) weights."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise InputError(f"model has parameters on the meta device (e.g. {meta}): load its weights before compressing")


def check_finite_weights(sites: Sequence[Site], weight: Any) -> None:
    """Every site's weight must be finite: an SVD or eigensolver of a NaN matrix fails far from the cause."""
    for site in sites:
        w = weight(site)
        if w.is_floating_point() and not bool(torch.isfinite(w).all()):
            bad = int((~torch.isfinite(w)).sum())
            raise InputError(f"site {site.name} has {bad} NaN or Inf value(s) in its {site.shape[0]}x{site.shape[1]} "
                             "weight: kronc compresses finite weights only (check how the model was loaded or trained)")


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (Hugging Face ``get_input_embeddings``, else a first-child
    `nn.Embedding`), or None when the model does not take token ids."""
    getter = getattr(model, "get_input_embeddings", None)
    emb: Any = None
    if callable(getter):
        try:
            emb = getter()
        except (NotImplementedError, AttributeError):
            emb = None
    if emb is None:
        emb = next(iter(model.children()), None)
    return int(emb.num_embeddings) if isinstance(emb, nn.Embedding) else None


def calibration_batches(model: nn.Module, calibration: Iterable[Any], what: str = "calibration") -> list[Any]:
    """``calibration`` as a checked list of batches (a 2-D tensor of ids: one batch per row)."""
    if isinstance(calibration, (str, bytes, Mapping)) or not isinstance(calibration, Iterable):
        raise InputError(f"{what} must be a list of batches (tensors of token ids, tuples or dicts of inputs), "
                         f"got a {type(calibration).__name__}")
    if isinstance(calibration, Tensor):
        if calibration.dim() == 2 and not calibration.is_floating_point():
            batches: list[Any] = list(calibration.unsqueeze(1).unbind(0))  # (batch, seq): batch one-row batches
        else:
            raise InputError(f"{what} as one tensor must be (batch, seq) token ids, got a {calibration.dim()}-D "
                             f"{str(calibration.dtype).removeprefix('torch.')} tensor: pass a list of batches instead")
    else:
        batches = list(calibration)
    if not batches:
        raise InputError(f"{what} is empty: give at least one batch (or leave it out to plan on weights only)")
    vocab, names = vocab_size(model), _keyword_names(model)
    return [check_inputs(b, f"{what}[{i}]", vocab, names) for i, b in enumerate(batches)]


def check_example_inputs(model: nn.Module, example_inputs: Any) -> Any:
    """``example_inputs`` checked like one calibration batch (None passes: capture then uses defaults)."""
    if example_inputs is None:
        return None
    return check_inputs(example_inputs, "example_inputs", vocab_size(model), _keyword_names(model))


def check_inputs(batch: Any, what: str, vocab: int | None, keywords: tuple[set[str], bool] | None) -> Any:
    """One batch, checked; a 1-D tensor of ids comes back as a ``(1, seq)`` batch."""
    if isinstance(batch, Tensor):
        return _check_tensor(batch, what, vocab, first=True)
    if isinstance(batch, Mapping):
        if not batch:
            raise InputError(f"{what} is an empty dict: give keyword inputs such as input_ids=...")
        for key in batch:
            if not isinstance(key, str):
                raise InputError(f"{what} has a key {key!r} that is not a string")
        if keywords is not None:
            named, open_ended = keywords
            unknown = [k for k in batch if k not in named]
            # a forward with **kwargs takes any key, but at least one must be an input it names
            if (unknown and not open_ended) or not any(k in named for k in batch):
                raise InputError(f"{what} has the key {unknown[0]!r}, which the model's forward does not take "
                                 f"(it takes {', '.join(sorted(named))})")
        return {k: _check_tensor(v, f"{what}[{k!r}]", vocab, first=k == "input_ids") if isinstance(v, Tensor)
                else _check_value(v, f"{what}[{k!r}]") for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise InputError(f"{what} is an empty {type(batch).__name__}: give the model's positional inputs")
        return type(batch)(_check_tensor(v, f"{what}[{i}]", vocab, first=i == 0) if isinstance(v, Tensor)
                           else _check_value(v, f"{what}[{i}]") for i, v in enumerate(batch))
    if batch is None:
        raise InputError(f"{what} is None: give a tensor of token ids, a tuple of tensors or a dict of keyword inputs")
    _check_value(batch, what)
    raise InputError(f"{what} is a {type(batch).__name__}: give a tensor of token ids, a tuple of tensors or a dict "
                     "of keyword inputs")


def _check_value(value: Any, what: str) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        raise InputError(f"{what} is a string: tokenize text into a tensor of token ids first")
    raise InputError(f"{what} is a {type(value).__name__}, not a tensor")


def _check_tensor(x: Tensor, what: str, vocab: int | None, first: bool) -> Tensor:
    if x.numel() == 0:
        raise InputError(f"{what} is empty (shape {tuple(x.shape)})")
    if x.is_meta:
        raise InputError(f"{what} is on the meta device: give real values")
    if x.is_floating_point() or x.is_complex():
        if first and vocab is not None:
            raise InputError(f"{what} holds {str(x.dtype).removeprefix('torch.')} values, but the model takes integer "
                             "token ids: convert with .long()")
        if not bool(torch.isfinite(x).all()):
            raise InputError(f"{what} holds NaN or Inf values: calibration must be finite")
        return x
    if first and vocab is not None and x.dtype != torch.bool:
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if x.dim() != 2:
            raise InputError(f"{what} is a {x.dim()}-D tensor of token ids; give (batch, seq) ids")
        low, high = int(x.min()), int(x.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise InputError(f"{what} has the token id {bad}, outside the model's vocabulary of {vocab} (0 to {vocab - 1})")
    return x


def _keyword_names(model: nn.Module) -> tuple[set[str], bool] | None:
    """The keyword arguments ``model.forward`` names, and whether it also takes ``**kwargs``."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind == p.VAR_KEYWORD for p in params)


def check_moments(moments: Mapping[str, Tensor] | None) -> None:
    """Input moments must be finite: NaN activations (from NaN inputs or an overflow) would plan on garbage."""
    for name, m in (moments or {}).items():
        if not bool(torch.isfinite(m).all()):
            raise InputError(f"calibration gave NaN or Inf inputs at site {name}: check the calibration batches "
                             "(and the model's dtype for overflows)")
