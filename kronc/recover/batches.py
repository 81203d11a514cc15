"""Training data for `kronc.recover`: a text, a token stream or batches, turned into model inputs.

* a ``str`` (with a tokenizer) or a 1-D integer tensor of token ids: cut into windows of
  ``seq_len + 1`` tokens (inputs are the first ``seq_len``, next-token targets the last ``seq_len``).
  Each epoch picks a random offset and a random order of the non-overlapping windows, both drawn
  from the seed and the epoch number only, so the batch of any step is the same in every run;
* a 2-D integer tensor ``(batch, seq)``: that many one-row batches (as `kronc.compile` reads
  calibration);
* an iterable of batches: integer tensors ``(batch, seq)`` of input ids, mappings of keyword inputs
  (``input_ids``, ``attention_mask``, HF-style ``labels``...), or tuples of positional tensors.
  Iterated in the order given; a re-iterable (a list, a DataLoader) starts over when it runs out,
  a one-shot iterator ends training.

Sources keep a small ``state_dict`` (epoch and position) so a resumed run continues with the same
batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from ..tokens import token_ids
from .config import RecoveryConfig, RecoveryError

IGNORE = -100
"""Target id that the language-model loss skips (as Hugging Face labels)."""


@dataclass
class Batch:
    """One step's model inputs and what the losses need from them."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    targets: Tensor | None = None
    """``(batch, seq)`` next-token ids for each input position (``IGNORE`` where there is none)."""
    mask: Tensor | None = None
    """``(batch, seq)`` bool, True at positions that count (from ``attention_mask``); None: all count."""
    tokens: int = 0
    """Input tokens (or rows, for inputs that are not token ids) in the batch."""

    def to(self, device: torch.device) -> Batch:
        def move(x: Any) -> Any:
            return x.to(device) if isinstance(x, Tensor) else x

        return Batch(tuple(move(a) for a in self.args), {k: move(v) for k, v in self.kwargs.items()},
                     move(self.targets), move(self.mask), self.tokens)


class BatchSource(Protocol):
    """Where a training loop gets its batches from."""

    def next(self) -> Batch | None:
        """The next batch, or None when the data has run out."""

    def peek(self) -> Batch | None:
        """A batch like the next one (an example input), without using any up."""

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: Mapping[str, int]) -> None: ...


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % (2**63)


class TokenWindows:
    """Batches of ``batch_size`` windows of ``seq_len + 1`` tokens from one token stream."""

    def __init__(self, ids: Tensor, seq_len: int, batch_size: int, seed: int, what: str = "the training data") -> None:
        ids = ids.reshape(-1)
        if ids.numel() == 0:
            raise RecoveryError(f"{what} is empty (0 tokens)")
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise RecoveryError(f"{what} must hold integer token ids, got {ids.dtype}")
        if ids.numel() < seq_len + 1:
            raise RecoveryError(f"{what} has {ids.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}: "
                                "give more text or a smaller seq_len")
        if int(ids.min()) < 0:
            raise RecoveryError(f"{what} has a negative token id ({int(ids.min())})")
        self.ids = ids.long().cpu()
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._order: tuple[int, Tensor] | None = None

    def starts(self, epoch: int) -> Tensor:
        """Start positions of the windows of ``epoch``, in the order they are used."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        n, t = self.ids.numel(), self.seq_len
        offset = int(torch.randint(0, min(t, n - t - 1) + 1, (1,), generator=g))
        count = (n - 1 - offset) // t  # windows [start, start + t] with stride t fit in the stream
        starts = offset + t * torch.randperm(count, generator=g)
        self._order = (epoch, starts)
        return starts

    def next(self) -> Batch:
        chosen: list[Tensor] = []
        need = self.batch_size
        while need:
            starts = self.starts(self.epoch)
            take = starts[self.pos : self.pos + need]
            chosen.append(take)
            need -= take.numel()
            self.pos += take.numel()
            if self.pos >= starts.numel():
                self.epoch, self.pos = self.epoch + 1, 0
        starts = torch.cat(chosen)
        windows = self.ids[starts[:, None] + torch.arange(self.seq_len + 1)]
        inputs = windows[:, :-1].contiguous()
        return Batch((inputs,), {}, windows[:, 1:].contiguous(), None, inputs.numel())

    def peek(self) -> Batch:
        state = self.state_dict()
        batch = self.next()
        self.load_state_dict(state)
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


class IterableBatches:
    """Batches taken from an iterable in its own order (started over when it can be)."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data = data
        self.reiterable = not isinstance(data, Iterator)  # a list or a DataLoader starts over; a generator does not
        self.epoch, self.consumed = 0, 0
        self._it: Iterator[Any] | None = None
        self._once: Iterator[Any] | None = None if self.reiterable else iter(data)  # a one-shot iterator, peeks put back

    def _fresh(self) -> Iterator[Any]:
        it = self._once if self._once is not None else iter(self.data)
        for _ in range(self.consumed):  # resuming: skip what the checkpointed run had used
            if next(it, _END) is _END:
                raise RecoveryError(f"the data has fewer than the {self.consumed} batches a checkpoint says were used")
        return it

    def peek(self) -> Batch | None:
        """The next batch of a one-shot iterator (put back in front of it); a re-iterable's first batch of a fresh
        pass (the next batch itself unless its order changes between passes)."""
        if self._once is None:
            state = self.state_dict()
            batch = self.next()
            self.load_state_dict(state)
            return batch
        if self._it is None:
            self._it = self._fresh()
        item = next(self._it, _END)
        if item is _END:
            return None
        self._it = self._once = itertools.chain([item], self._it)
        return to_batch(item, f"batch {self.consumed} of epoch {self.epoch}")

    def next(self) -> Batch | None:
        if self._it is None:
            self._it = self._fresh()
        item = next(self._it, _END)
        if item is _END:
            if self.consumed == 0:
                raise RecoveryError("the data yielded no batches")
            if not self.reiterable:
                return None
            self.epoch, self.consumed = self.epoch + 1, 0
            self._it = iter(self.data)
            item = next(self._it, _END)
            if item is _END:
                return None
        self.consumed += 1
        return to_batch(item, f"batch {self.consumed - 1} of epoch {self.epoch}")

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._it = None


_END = object()


def _next_token_targets(ids: Tensor) -> Tensor:
    """Targets for inputs ``ids``: the following id at each position, `IGNORE` at the last."""
    return torch.cat([ids[..., 1:], torch.full_like(ids[..., :1], IGNORE)], dim=-1)


def to_batch(item: Any, what: str = "the batch") -> Batch:
    """A `Batch` from one element of an iterable: a tensor, a mapping of keyword inputs or a tuple."""
    if isinstance(item, Tensor):
        if item.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            seq = item.long().reshape(1, -1) if item.dim() == 1 else item.long()
            return Batch((seq,), {}, _next_token_targets(seq) if seq.dim() == 2 else None, None, seq.numel())
        return Batch((item,), {}, None, None, _rows(item))
    if isinstance(item, Mapping):
        kwargs = dict(item)
        labels = kwargs.pop("labels", None)  # HF convention: aligned with input_ids, shifted inside the loss
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if not any(isinstance(v, Tensor) for v in kwargs.values()):
            raise RecoveryError(f"{what} is a mapping without tensors (keys: {', '.join(map(str, kwargs)) or 'none'})")
        targets = None
        source = labels if isinstance(labels, Tensor) else ids
        if isinstance(source, Tensor) and source.dim() == 2 and not source.is_floating_point():
            targets = _next_token_targets(source.long())
            if isinstance(mask, Tensor) and labels is None:  # no target where the next position is padding
                next_is_real = _next_token_targets(mask.long()) > 0
                targets = targets.masked_fill(~next_is_real, IGNORE)
        tokens = ids.numel() if isinstance(ids, Tensor) else _rows(next(v for v in kwargs.values() if isinstance(v, Tensor)))
        return Batch((), kwargs, targets, mask.bool() if isinstance(mask, Tensor) else None, tokens)
    if isinstance(item, (tuple, list)) and item and all(isinstance(x, Tensor) for x in item):
        first = to_batch(item[0], what)
        return Batch(tuple(item), {}, first.targets, None, first.tokens)
    raise RecoveryError(f"{what} is a {type(item).__name__}: give tensors of input ids, mappings of model inputs "
                        "(input_ids=...) or tuples of tensors")


def _rows(x: Tensor) -> int:
    return int(x.shape[:-1].numel()) if x.dim() > 1 else int(x.shape[0]) if x.dim() == 1 else 1


def make_batches(data: Any, config: RecoveryConfig, tokenizer: Any = None) -> BatchSource:
    """The batch source for ``data`` (see the module docstring for the accepted forms)."""
    if isinstance(data, str):
        if not data.strip():
            raise RecoveryError("the training text is empty")
        if tokenizer is None:
            raise RecoveryError("a training text needs a tokenizer (tokenizer=...); or pass token ids as a 1-D tensor")
        ids = token_ids(tokenizer, data)
        return TokenWindows(ids, config.seq_len, config.batch_size, config.seed, "the training text")
    if isinstance(data, Tensor):
        if data.dim() == 1:
            return TokenWindows(data, config.seq_len, config.batch_size, config.seed, "the token stream")
        if data.dim() == 2 and not data.is_floating_point() and not data.is_complex() and data.dtype != torch.bool:
            if data.numel() == 0:
                raise RecoveryError(f"the (batch, seq) tensor of training ids is empty (shape {tuple(data.shape)})")
            return IterableBatches(list(data.unsqueeze(1).unbind(0)))  # as kronc.compile reads it: one batch per row
        raise RecoveryError(f"a tensor of training data must be 1-D token ids (a stream) or 2-D (batch, seq) integer ids "
                            f"(one batch per row), got a {str(data.dtype).removeprefix('torch.')} tensor of shape "
                            f"{tuple(data.shape)}")
    if isinstance(data, (bytes, Mapping)) or not isinstance(data, Iterable):
        raise RecoveryError(f"cannot train on a {type(data).__name__}: give a text (with a tokenizer), a 1-D tensor "
                            "of token ids or an iterable of batches")
    return IterableBatches(data)
