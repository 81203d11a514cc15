"""Block-wise reconstruction: train each compressed block to reproduce its dense block, one at a time.

::

    small = kronc.compile(model, budget="10x")
    result = kronc.recover(small, model, ids, method="blockwise")   # or reconstruct_blocks(small, model, ids)
    print(result.blocks)

The pipeline of GPTQ's sequential mode, OmniQuant and EfficientQAT's block phase, on kronc's blocks
(`kronc.recover.blocks`):

1. run the student on ``blockwise.samples`` calibration windows up to its first block (a forward
   pre-hook with kwargs records the block's inputs, attention masks and position embeddings included,
   and stops the pass), then cache them in memory or on disk;
2. for each block in order: the targets come from the dense teacher block (``blockwise.target``):
   on the **student's** cached inputs (GPTQ's objective: behave like the dense block on what the block
   will really be fed; drift from earlier blocks is carried on, not corrected), on the **dense model's
   own stream** at that depth (OmniQuant's main target: the block also undoes the drift before it), or
   ``both`` losses summed (the default; OmniQuant's ``aug_loss``; on a 10x toy Llama it gave the lowest
   output error of the three, by a few percent). The block's trainable parameters (``trainable``:
   factors, overlay values, block values, norms, biases) train with AdamW on the per-position relative
   squared error (`losses.relative_mse`) for ``epochs`` passes; then the trained block's outputs become
   the next block's inputs (sequential), and the dense stream advances through the dense block;
   after the last block, the tail (final norm, LM head) trains on the model output (`kronc.recover.tail`);
3. optionally a short end-to-end distillation pass (`kronc.recover.loop`) that trains only a few
   parameters (``e2e_trainable``, norms and biases by default), as EfficientQAT's second phase.

A block whose loss on the calibration set ends above where it started gets its weights from before
its training back (a warning, and ``kept_initial`` in its `BlockRecord`). With ``checkpoint_path`` a
checkpoint is written after every block; ``resume=True`` recaptures the inputs, replays the finished
blocks' outputs and continues at the block the run was in, with the same weights as a run never
interrupted (every block seeds its own batch order from ``seed`` and its index).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .batches import Batch, TokenWindows, make_batches
from .blocks import Block, BlockChain, Slot, find_blocks, first_tensor
from .checkpoint import MAY_CHANGE_ON_RESUME
from .config import RecoveryConfig, RecoveryError, make_config
from .guards import check_models, check_windows, device_of, models_restored, seeded
from .loop import distill
from .losses import kl_loss, model_output, relative_mse, takes_argument
from .optim import make_optimizer, make_scheduler, trainable_parameters
from .result import RecoveryResult
from .tail import blocks_skipped

log = logging.getLogger("kronc.recover")
KIND = "kronc.recover blockwise checkpoint"
VERSION = 1


@dataclass(frozen=True)
class BlockRecord:
    """How one block's reconstruction went (losses are mean relative squared errors on the calibration set)."""

    name: str
    params: int
    """Trainable parameter values in the block."""
    loss_before: float
    loss_after: float
    """The loss of the weights the block ends with (``loss_before`` when it kept its initial weights)."""
    kept_initial: bool
    """True when training raised the loss (or made it non-finite) and the block got its old weights back."""
    loss_trained: float
    """The loss training reached (NaN when it became non-finite), kept or not."""
    steps: int
    seconds: float
    tokens: int
    """Input tokens the block's training steps processed (windows x positions, all epochs)."""
    timed_out: bool = False
    """True when the block's share of ``blockwise.max_seconds`` ran out before all its epochs."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class BlockwiseResult(RecoveryResult):
    """A `RecoveryResult` whose history is the end-to-end pass (empty without one), plus one record per block."""

    blocks: list[BlockRecord] = field(default_factory=list)
    block_seconds: float = 0.0
    """Seconds of the block phase (capture, targets, training, propagation) in this call."""

    def __str__(self) -> str:
        kept = sum(b.kept_initial for b in self.blocks)
        timed = sum(b.timed_out for b in self.blocks)
        notes = [f"{kept} kept their initial weights"] * bool(kept) + [f"{timed} cut short by max_seconds"] * bool(timed)
        done = f"{len(self.blocks)} blocks" + (f" ({'; '.join(notes)})" if notes else "")
        losses = " ".join(f"{b.loss_before:.3g}->{b.loss_after:.3g}" for b in self.blocks)
        e2e = f"; then {RecoveryResult.__str__(self)}" if self.history else ""
        return f"block-wise reconstruction: {done} in {self.block_seconds:.1f}s, losses {losses}{e2e}"


class _Stop(Exception):
    """Raised by the capture hook to end a forward pass once the first block's inputs are recorded."""


def _detach(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    if isinstance(x, list):
        return [_detach(v) for v in x]
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


def _nbytes(x: Any) -> int:
    if isinstance(x, Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(v) for v in x)
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    return 0


Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def _stream(inputs: Inputs, slot: Slot) -> Tensor:
    args, kwargs = inputs
    return args[slot] if isinstance(slot, int) else kwargs[slot]


def _with_stream(inputs: Inputs, slot: Slot, x: Tensor) -> Inputs:
    args, kwargs = inputs
    if isinstance(slot, int):
        return (*args[:slot], x, *args[slot + 1 :]), kwargs
    return args, {**kwargs, slot: x}


class _Cache:
    """Each calibration batch's block inputs, the teacher's target and the positions' mask."""

    def __init__(self, disk: str | None) -> None:
        self.dir, self.owned = disk, False
        if disk == "":
            self.dir, self.owned = tempfile.mkdtemp(prefix="kronc-blockwise-"), True
        elif disk is not None:
            Path(disk).mkdir(parents=True, exist_ok=True)
        self.inputs: list[Any] = []
        self.targets: list[Any] = []
        self.extra_targets: list[Any] = []
        self.teacher_streams: list[Any] = []
        self.masks: list[Tensor | None] = []

    def _put(self, store: list[Any], j: int, kind: str, value: Any) -> None:
        if self.dir is not None:
            path = os.path.join(self.dir, f"{kind}{j}.pt")
            torch.save(value, path)
            value = path
        if j == len(store):
            store.append(value)
        else:
            store[j] = value

    def _get(self, store: list[Any], j: int) -> Any:
        value = store[j]
        return torch.load(value, weights_only=False) if self.dir is not None else value

    def set_inputs(self, j: int, value: Inputs) -> None:
        self._put(self.inputs, j, "x", value)

    def get_inputs(self, j: int) -> Inputs:
        return self._get(self.inputs, j)

    def set_target(self, j: int, value: Tensor) -> None:
        self._put(self.targets, j, "y", value)

    def get_target(self, j: int) -> Tensor:
        return self._get(self.targets, j)

    def set_extra_target(self, j: int, value: Tensor) -> None:
        self._put(self.extra_targets, j, "z", value)

    def get_extra_target(self, j: int) -> Tensor:
        return self._get(self.extra_targets, j)

    def set_teacher_stream(self, j: int, value: Tensor) -> None:
        self._put(self.teacher_streams, j, "t", value)

    def get_teacher_stream(self, j: int) -> Tensor:
        return self._get(self.teacher_streams, j)

    def __len__(self) -> int:
        return len(self.inputs)

    def close(self) -> None:
        if self.owned and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def reconstruct_blocks(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    config: RecoveryConfig | Mapping[str, Any] | None = None,
    *,
    tokenizer: Any = None,
    resume: bool | str | Path = False,
    progress: bool = True,
    **overrides: Any,
) -> BlockwiseResult:
    """Reconstruct ``student`` block by block against the dense ``teacher``, in place (see the module docstring).

    ``data``, ``config``, ``tokenizer``, ``overrides`` and ``resume`` as `kronc.recover`; the block phase is
    set by ``config.blockwise``. The teacher is never modified. Raises `RecoveryError` before any training
    for unusable data, no block structure, or an in-memory cache over ``blockwise.max_cache_gb``.
    """
    cfg = make_config(config, overrides)
    check_models(student, teacher)
    batches = _calibration(student, data, cfg, tokenizer)
    params = trainable_parameters(student, cfg.trainable)
    if not params:
        raise RecoveryError(f"no trainable parameters: trainable={cfg.trainable!r} selects none of the student's "
                            "parameters (was it compressed with kronc.compile?)")
    extra = {"use_cache": False} if takes_argument(student, "use_cache") else {}
    first = batches[0].to(device_of(student))
    probe_args = tuple(_rows(a) for a in first.args)
    probe_kwargs = {k: _rows(v) for k, v in {**first.kwargs, **extra}.items()}
    with models_restored(student, teacher):
        student.eval()
        chain = find_blocks(student, teacher, probe_args, probe_kwargs)
    state = _load(resume, cfg, len(chain.blocks)) if resume not in (False, None) else None
    cache = _Cache(None if cfg.blockwise.cache == "memory" else (cfg.blockwise.cache_dir or ""))
    t0 = time.perf_counter()
    deadline = None if cfg.blockwise.max_seconds is None else t0 + cfg.blockwise.max_seconds
    try:
        with seeded(cfg.seed, device_of(student)), models_restored(student, teacher):
            student.eval()
            teacher.eval()
            if state is not None:
                student.load_state_dict(state["student"])
            records = [BlockRecord(**r) for r in state["records"]] if state else []
            start, count = len(records), len(chain.blocks)
            if start < count or (start == count and cfg.blockwise.tail):
                _capture(student, teacher, chain, batches, extra, cache, cfg, progress)
                _run_blocks(student, chain, cache, cfg, params, records, start, progress, deadline)
                if cfg.blockwise.tail:
                    records.append(_train_tail(student, teacher, chain, cache, batches, extra, cfg, params, progress,
                                               deadline))
                    _report(records[-1])
                    if cfg.checkpoint_path is not None:
                        _save(cfg, student, records)
    finally:
        cache.close()
    block_seconds = time.perf_counter() - t0
    result = BlockwiseResult([], 0, "steps", block_seconds, sum(r.tokens for r in records), blocks=records,
                             block_seconds=block_seconds, checkpoint=cfg.checkpoint_path)
    if cfg.blockwise.e2e_steps > 0:
        result = _end_to_end(student, teacher, data, cfg, tokenizer, resume, progress, result)
    return result


def _rows(x: Any) -> Any:
    """The first row of a batch tensor (block discovery needs one example, not the whole batch)."""
    return x[:1] if isinstance(x, Tensor) and x.dim() >= 1 and x.shape[0] > 1 else x


def _calibration(student: nn.Module, data: Any, cfg: RecoveryConfig, tokenizer: Any) -> list[Batch]:
    source = make_batches(data, cfg, tokenizer)
    if isinstance(source, TokenWindows):
        check_windows(student, source, cfg)
    wanted = math.ceil(cfg.blockwise.samples / cfg.batch_size)
    batches: list[Batch] = []
    while len(batches) < wanted:
        b = source.next()
        if b is None:
            break
        batches.append(b)
    if not batches:
        raise RecoveryError("the calibration data gave no batch: block-wise reconstruction needs at least one")
    return batches


def _capture(student: nn.Module, teacher: nn.Module, chain: BlockChain, batches: list[Batch], extra: dict[str, Any],
             cache: _Cache, cfg: RecoveryConfig, progress: bool) -> None:
    """Record the first block's inputs for every calibration batch (stopping each pass there)."""
    seen: list[Inputs] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((_detach(args), _detach(kwargs)))
        raise _Stop

    device = device_of(student)
    handle = chain.entry.register_forward_pre_hook(hook, with_kwargs=True)
    t_handle = chain.teacher_entry.register_forward_pre_hook(hook, with_kwargs=True)
    teacher_stream = cfg.blockwise.target != "student_inputs"
    try:
        for j, batch in enumerate(batches):
            b = batch.to(device)
            if teacher_stream:
                with torch.no_grad(), contextlib.suppress(_Stop):
                    teacher(*b.args, **b.kwargs, **extra)
                cache.set_teacher_stream(j, _stream(seen.pop(), chain.blocks[0].slot))
            with torch.no_grad(), contextlib.suppress(_Stop):
                student(*b.args, **b.kwargs, **extra)
            if len(seen) != 1:
                raise RecoveryError(f"the first block {chain.blocks[0].name!r} ran {len(seen)} times in one forward "
                                    "pass; block-wise reconstruction needs each block to run once")
            inputs = seen.pop()
            if chain.entry is not chain.blocks[0].student and (len(inputs[0]) != 1 or inputs[1]):
                raise RecoveryError(f"{chain.container!r} was called with an initial state or keyword inputs; "
                                    "block-wise reconstruction splits LSTMs called on their input alone")
            if j == 0:
                _check_memory(inputs, chain, len(batches), cfg, progress)
            cache.set_inputs(j, inputs)
            cache.masks.append(b.mask)
    finally:
        handle.remove()
        t_handle.remove()


def _check_memory(inputs: Inputs, chain: BlockChain, n: int, cfg: RecoveryConfig, progress: bool) -> int:
    """Print (and log) the cache's size in bytes, and return it; raise when it is over ``max_cache_gb`` in memory."""
    one = _nbytes(_stream(inputs, chain.blocks[0].slot))
    # the blocks' targets (+ the dense stream); the tail's target is the teacher's final stream, one stream
    # (in the place of the blocks' target), never the model's outputs: their vocabulary does not count
    stream = {"student_inputs": 1, "teacher_stream": 2, "both": 3}[cfg.blockwise.target] * one
    total = n * (_nbytes(inputs) + stream)  # inputs (masks, position embeddings included) + the targets
    bw = cfg.blockwise
    where = "on disk" if bw.cache == "disk" else "in memory"
    message = (f"block-wise cache: {n} batches x {cfg.batch_size} windows, inputs {_nbytes(inputs) / 2**20:.1f} MiB + "
               f"targets {stream / 2**20:.1f} MiB per batch = {total / 2**20:.1f} MiB {where}")
    log.info(message)
    if progress:
        print(f"[kronc.recover] {message}", file=sys.stderr, flush=True)
    if bw.cache == "memory" and total > bw.max_cache_gb * 2**30:
        raise RecoveryError(f"the block-wise cache needs {total / 2**30:.2f} GiB, over max_cache_gb={bw.max_cache_gb}: "
                            "set blockwise.cache='disk' (and cache_dir), or fewer blockwise.samples")
    return total


def _bar(total: int, desc: str, enabled: bool, position: int, leave: bool, initial: int = 0) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="step" if position else "block", position=position,
                leave=leave, dynamic_ncols=True)


def _run_blocks(student: nn.Module, chain: BlockChain, cache: _Cache, cfg: RecoveryConfig,
                params: dict[str, nn.Parameter], records: list[BlockRecord], start: int, progress: bool,
                deadline: float | None = None) -> None:
    """Replay the finished blocks (resume), then train, check, propagate and checkpoint the rest (each
    block until its share of the time left before ``deadline``, when there is one)."""
    outer = _bar(len(chain.blocks), "blocks", progress, 0, True, start)
    try:
        for i, block in enumerate(chain.blocks):
            block.student.eval()
            block.teacher.eval()
            if i >= start:
                until = _share(deadline, len(chain.blocks) - i + cfg.blockwise.tail)
                record = _train_block(student, i, block, cache, cfg, params, progress, until)
                records.append(record)
                _report(record)
                if outer is not None:
                    outer.set_postfix({"block": block.name, "loss": f"{record.loss_after:.4g}"}, refresh=False)
                    outer.update(1)
            _propagate(block, cache)
            if i >= start and cfg.checkpoint_path is not None:
                _save(cfg, student, records)
    finally:
        if outer is not None:
            outer.close()


def _share(deadline: float | None, left: int) -> float | None:
    """When a block must stop training: an equal share of the time left for the ``left`` blocks to come."""
    if deadline is None:
        return None
    now = time.perf_counter()
    return now + max(deadline - now, 0.0) / max(left, 1)


def _report(record: BlockRecord) -> None:
    if record.kept_initial:
        message = (f"block {record.name}: loss {record.loss_before:.4g} rose to {record.loss_trained:.4g} in "
                   "training; it keeps its weights from before")
        warnings.warn(message, stacklevel=4)
        log.warning(message)


def _block_loss(block: Block, cache: _Cache, j: int) -> Tensor:
    args, kwargs = cache.get_inputs(j)
    out = first_tensor(block.student(*args, **kwargs))
    loss = relative_mse(out, cache.get_target(j), cache.masks[j])
    if cache.extra_targets:
        loss = loss + relative_mse(out, cache.get_extra_target(j), cache.masks[j])
    return loss


def _train_block(student: nn.Module, i: int, block: Block, cache: _Cache, cfg: RecoveryConfig,
                 params: dict[str, nn.Parameter], progress: bool, until: float | None = None) -> BlockRecord:
    """Targets from the teacher block on the student's inputs, then AdamW on this block's trainable parameters."""
    target = cfg.blockwise.target
    with torch.no_grad():
        for j in range(len(cache)):
            inputs = cache.get_inputs(j)
            own = first_tensor(block.teacher(*inputs[0], **inputs[1])).detach() if target != "teacher_stream" else None
            dense = None
            if target != "student_inputs":  # the dense block on the dense stream, with the same masks / positions
                t_args, t_kwargs = _with_stream(inputs, block.slot, cache.get_teacher_stream(j))
                dense = first_tensor(block.teacher(*t_args, **t_kwargs)).detach()
            cache.set_target(j, dense if dense is not None else own)  # type: ignore[arg-type]
            if target == "both":
                cache.set_extra_target(j, own)  # type: ignore[arg-type]
    mine = {id(p) for p in block.student.parameters()}
    chosen = {n: p for n, p in params.items() if id(p) in mine}
    tokens = [int(_stream(cache.get_inputs(j), block.slot).shape[:-1].numel()) for j in range(len(cache))]
    return _fit(student, block.name, i, chosen, lambda j: _block_loss(block, cache, j), tokens, cfg, progress, until)


def _train_tail(student: nn.Module, teacher: nn.Module, chain: BlockChain, cache: _Cache, batches: list[Batch],
                extra: dict[str, Any], cfg: RecoveryConfig, params: dict[str, nn.Parameter],
                progress: bool, deadline: float | None = None) -> BlockRecord:
    """What follows the last block, trained on the model's output (see `kronc.recover.tail`).

    The teacher's outputs (logits: windows x positions x vocabulary, 12 GiB for 128 windows of 512 on a
    49k vocabulary) are not cached: its final stream is (one hidden stream per batch), and each step runs
    the teacher's own tail on it, with the teacher's blocks skipped the same way as the student's.
    """
    device = device_of(student)
    last = chain.blocks[-1]
    with torch.no_grad():
        args, kwargs = cache.get_inputs(0)
        tuple_output = isinstance(last.student(*args, **kwargs), tuple)
        for j, batch in enumerate(batches):
            cache.set_target(j, _teacher_final_stream(teacher, chain, batch.to(device), extra))
    in_blocks = {id(p) for blk in chain.blocks for p in blk.student.parameters()}
    chosen = {n: p for n, p in params.items() if id(p) not in in_blocks}
    kinds: dict[str, str] = {}
    with blocks_skipped(student, chain, tuple_output) as feed, blocks_skipped(teacher, chain, tuple_output) as t_feed:

        def loss(j: int) -> Tensor:
            b = batches[j].to(device)
            with torch.no_grad():
                t_feed.value = cache.get_target(j)
                t, out_kind = model_output(teacher(*b.args, **b.kwargs, **extra))
            feed.value = _stream(cache.get_inputs(j), last.slot)
            s = model_output(student(*b.args, **b.kwargs, **extra))[0]
            kind = kinds.setdefault("kind", cfg.output_loss if cfg.output_loss != "auto"
                                    else ("mse" if out_kind == "hidden" else "kl"))
            return kl_loss(s, t, cfg.temperature, b.mask) if kind == "kl" else relative_mse(s, t, b.mask)

        tokens = [b.tokens for b in batches]
        return _fit(student, f"tail after {last.name}", len(chain.blocks), chosen, loss, tokens, cfg, progress,
                    deadline)


def _teacher_final_stream(teacher: nn.Module, chain: BlockChain, b: Batch, extra: dict[str, Any]) -> Tensor:
    """The teacher's stream after its last block (its pass stops there: the tail runs per step)."""
    seen: list[Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        seen.append(first_tensor(out).detach())
        raise _Stop

    recurrent = chain.entry is not chain.blocks[0].student  # layer views: the whole recurrent module's output
    module = chain.teacher_entry if recurrent else chain.blocks[-1].teacher
    handle = module.register_forward_hook(hook)
    try:
        with contextlib.suppress(_Stop):
            teacher(*b.args, **b.kwargs, **extra)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RecoveryError(f"the teacher's last block {chain.blocks[-1].name!r} ran {len(seen)} times in one "
                            "forward pass; block-wise reconstruction needs each block to run once")
    return seen[0]


def _fit(student: nn.Module, name: str, index: int, chosen: dict[str, nn.Parameter], loss_of: Any,
         tokens_of: list[int], cfg: RecoveryConfig, progress: bool, until: float | None = None) -> BlockRecord:
    """``epochs`` passes of AdamW over the cached batches (order seeded by ``seed`` and ``index``), no step
    starting after ``until`` (a `time.perf_counter` value; None: all of them); the parameters go back to
    where they started when the mean loss ends higher (or non-finite)."""
    bw = cfg.blockwise
    n = len(tokens_of)

    def mean_loss() -> float:
        with torch.no_grad():
            return float(torch.stack([loss_of(j).reshape(()) for j in range(n)]).mean())

    loss_before = mean_loss()
    chosen = {k: p for k, p in chosen.items() if p.numel()}
    if not chosen:
        return BlockRecord(name, 0, loss_before, loss_before, False, loss_before, 0, 0.0, 0)
    saved = {k: p.detach().clone() for k, p in chosen.items()}
    ids = {id(p) for p in chosen.values()}
    for p in student.parameters():
        p.requires_grad_(id(p) in ids)
    steps = bw.epochs * n
    block_cfg = cfg.model_copy(update={"lr": bw.lr, "steps": steps})
    optimizer = make_optimizer(student, chosen, block_cfg)
    scheduler = make_scheduler(optimizer, block_cfg)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7_919 * (index + 1))
    bar = _bar(steps, name, progress, 1, False)
    tokens, finite, used, done, timed_out, t0 = 0, True, 0, 0, False, time.perf_counter()
    try:
        for _ in range(bw.epochs):
            for j in torch.randperm(n, generator=g).tolist():
                if until is not None and time.perf_counter() >= until:
                    timed_out = True
                    break
                optimizer.zero_grad(set_to_none=True)
                loss = loss_of(j)
                if not torch.isfinite(loss):
                    finite = False
                    break
                loss.backward()
                used = used or sum(p.numel() for p in chosen.values() if p.grad is not None)
                torch.nn.utils.clip_grad_norm_(list(chosen.values()), cfg.grad_clip or math.inf)
                optimizer.step()
                scheduler.step()
                tokens += tokens_of[j]
                done += 1
                if bar is not None:
                    bar.set_postfix({"loss": f"{float(loss.detach()):.4g}"}, refresh=False)
                    bar.update(1)
            if not finite or timed_out:
                break
    finally:
        if bar is not None:
            bar.close()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    trained = (mean_loss() if done else loss_before) if finite else math.nan
    kept = not (math.isfinite(trained) and trained <= loss_before)
    if kept:
        with torch.no_grad():
            for k, p in chosen.items():
                p.copy_(saved[k])
    return BlockRecord(name, used, loss_before, loss_before if kept else trained, kept, trained, done, seconds, tokens,
                       timed_out)


def _propagate(block: Block, cache: _Cache) -> None:
    """The trained block's outputs become the next block's inputs (same masks and position embeddings)."""
    with torch.no_grad():
        for j in range(len(cache)):
            inputs = cache.get_inputs(j)
            out = first_tensor(block.student(*inputs[0], **inputs[1])).detach()
            if cache.teacher_streams:
                t_args, t_kwargs = _with_stream(inputs, block.slot, cache.get_teacher_stream(j))
                cache.set_teacher_stream(j, first_tensor(block.teacher(*t_args, **t_kwargs)).detach())
            cache.set_inputs(j, _with_stream(inputs, block.slot, out))


def _save(cfg: RecoveryConfig, student: nn.Module, records: list[BlockRecord]) -> None:
    assert cfg.checkpoint_path is not None
    path = Path(cfg.checkpoint_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"kind": KIND, "version": VERSION, "config": cfg.model_dump(mode="json"),
            "student": {k: v.detach().clone() for k, v in student.state_dict().items()},
            "records": [r.__dict__ for r in records]}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)


def _load(resume: bool | str | Path, cfg: RecoveryConfig, blocks: int) -> dict[str, Any] | None:
    """The checkpoint to continue from: ``checkpoint_path`` (resume=True; None when not written yet) or a file."""
    if resume is True:
        if cfg.checkpoint_path is None:
            raise RecoveryError("resume=True needs checkpoint_path (or pass the checkpoint file as resume=PATH)")
        if not Path(cfg.checkpoint_path).is_file():
            return None
        path = Path(cfg.checkpoint_path)
    else:
        path = Path(resume)  # type: ignore[arg-type]
        if not path.is_file():
            raise RecoveryError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise RecoveryError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(data, dict) or data.get("kind") != KIND or data.get("version") != VERSION:
        raise RecoveryError(f"{path} is not a kronc.recover block-wise checkpoint (version {VERSION})")
    saved = RecoveryConfig.model_validate(data["config"]).model_dump(mode="json")
    now = cfg.model_dump(mode="json")
    may_change = MAY_CHANGE_ON_RESUME | {"blockwise"}
    changed = [k for k in now if k not in may_change and now[k] != saved.get(k)]
    changed += [f"blockwise.{k}" for k in now["blockwise"] if not k.startswith(("cache", "max_", "e2e"))
                and now["blockwise"][k] != saved["blockwise"].get(k)]
    if changed:
        raise RecoveryError(f"{path} was written with a different recipe ({', '.join(changed)} differ): resume with "
                            "the same settings")
    if len(data["records"]) > blocks:
        raise RecoveryError(f"{path} has {len(data['records'])} finished blocks but the student has {blocks}")
    return data


def _end_to_end(student: nn.Module, teacher: nn.Module, data: Any, cfg: RecoveryConfig, tokenizer: Any,
                resume: bool | str | Path, progress: bool, blocks: BlockwiseResult) -> BlockwiseResult:
    """The short distillation pass after the blocks, training ``e2e_trainable`` only."""
    bw = cfg.blockwise
    e2e_path = None if cfg.checkpoint_path is None else f"{cfg.checkpoint_path}.e2e"
    e2e_cfg = cfg.model_copy(update={"method": "distill", "steps": bw.e2e_steps, "trainable": bw.e2e_trainable,
                                     "lr": bw.e2e_lr or cfg.lr, "checkpoint_path": e2e_path})
    res = distill(student, teacher, data, e2e_cfg, tokenizer=tokenizer, resume=bool(resume) and e2e_path is not None,
                  progress=progress)
    return BlockwiseResult(res.history, res.steps, res.stopped, blocks.block_seconds + res.seconds,
                           blocks.tokens + res.tokens, res.resumed_from, res.checkpoint, blocks=blocks.blocks,
                           block_seconds=blocks.block_seconds)
