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
   factors, overlay values, block values, quantization scales (`kronc.recover.scales`), norms, biases)
   train with AdamW on the per-position relative squared error (`losses.relative_mse`) for ``epochs``
   passes; integer-quantized tensors (with ``blockwise.quantized="latent"``, EfficientQAT's Block-AP; the default ``"scales"`` trains only scales and minima)
   train their latent weights through fake quantization beside the scales and minima, and are re-encoded
   into the same packed codes when the block ends (`kronc.recover.scales.latent_trained`); then the trained
   (re-encoded) block's outputs become
   the next block's inputs (sequential), and the dense stream advances through the dense block;
   after the last block, the tail (final norm, LM head) trains on the model output (`kronc.recover.tail`);
3. optionally a short end-to-end distillation pass (`kronc.recover.loop`) that trains only a few
   parameters (``e2e_trainable``, norms and biases by default), as EfficientQAT's second phase.

A block whose loss on the calibration set ends above where it started gets its weights from before
its training back (a warning, and ``kept_initial`` in its `BlockRecord`). With ``checkpoint_path`` a
checkpoint is written after every block; ``resume=True`` recaptures the inputs, replays the finished
blocks' outputs and continues at the block the run was in, with the same weights as a run never
interrupted (every block seeds its own batch order from ``seed`` and its index).

Under an initialised torch.distributed process group the reconstruction is data-parallel
(`kronc.recover.parallel`): each rank caches an equal slice of every calibration batch's rows (rows that
do not split evenly are refused in one line before any work), propagates its own slice from block to
block, and every block step averages the gradients and losses over the ranks, so all ranks take the
same steps and make the same keep-or-revert decision; rank 0 alone writes the checkpoints (the others
wait at a barrier), and a rank that raises stops the others with its error at their next exchange.

This module is the driver; the cache and its capture are `kronc.recover.block_cache`, one block's
training loop `kronc.recover.block_fit`, the checkpoints `kronc.recover.block_checkpoint`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import parallel
from .batches import Batch, TokenWindows, make_batches
from .block_cache import BlockCache, capture_inputs, stream_of, teacher_final_stream, with_stream
from .block_checkpoint import load_blocks, save_blocks
from .block_fit import BlockRecord, fit, progress_bar, report
from .blocks import Block, BlockChain, find_blocks, first_tensor
from .config import RecoveryConfig, RecoveryError, make_config
from .guards import check_models, check_windows, device_of, models_restored, seeded
from .loop import distill
from .losses import kl_loss, model_output, relative_mse, takes_argument
from .optim import TRAINED_ROLES, trainable_parameters
from .result import RecoveryResult
from .scales import latent_trained, scales_trained
from .sharding import check_shard
from .tail import blocks_skipped

__all__ = ["BlockRecord", "BlockwiseResult", "reconstruct_blocks"]


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
    if cfg.shard:
        check_shard([])  # the end-to-end pass shards (the block phase is data-parallel): fail before the blocks
    progress = progress and parallel.is_writer()  # one progress display per job
    with scales_trained(student), parallel.shared_failures():  # scales train as fp32, stored back as fp16
        return _reconstruct(student, teacher, data, cfg, tokenizer, resume, progress)


def _reconstruct(student: nn.Module, teacher: nn.Module, data: Any, cfg: RecoveryConfig, tokenizer: Any,
                 resume: bool | str | Path, progress: bool) -> BlockwiseResult:
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
    state = load_blocks(resume, cfg, len(chain.blocks)) if resume not in (False, None) else None
    cache = BlockCache(_cache_dir(cfg))
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
                capture_inputs(student, teacher, chain, batches, extra, cache, cfg, progress)
                parallel.write_then_wait(lambda: None)  # a rank whose capture failed stops the others here
                _run_blocks(student, chain, cache, cfg, params, records, start, progress, deadline)
                if cfg.blockwise.tail:
                    records.append(_train_tail(student, teacher, chain, cache, batches, extra, cfg, params, progress,
                                               deadline))
                    report(records[-1])
                    if cfg.checkpoint_path is not None:
                        parallel.write_then_wait(lambda: save_blocks(cfg, student, records))
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


def _cache_dir(cfg: RecoveryConfig) -> str | None:
    """None (in memory), "" (a temporary folder) or the folder; under torch.distributed one folder per rank."""
    bw = cfg.blockwise
    if bw.cache == "memory":
        return None
    if bw.cache_dir and parallel.active():
        return str(Path(bw.cache_dir) / f"rank{parallel.dist.rank()}")
    return bw.cache_dir or ""


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
    # under torch.distributed: this rank's slice of every batch, all checked before any work
    return [parallel.shard(b, f"calibration batch {j}") for j, b in enumerate(batches)]


def _run_blocks(student: nn.Module, chain: BlockChain, cache: BlockCache, cfg: RecoveryConfig,
                params: dict[str, nn.Parameter], records: list[BlockRecord], start: int, progress: bool,
                deadline: float | None = None) -> None:
    """Replay the finished blocks (resume), then train, check, propagate and checkpoint the rest (each
    block until its share of the time left before ``deadline``, when there is one)."""
    outer = progress_bar(len(chain.blocks), "blocks", progress, 0, True, start)
    try:
        for i, block in enumerate(chain.blocks):
            block.student.eval()
            block.teacher.eval()
            if i >= start:
                until = _share(deadline, len(chain.blocks) - i + cfg.blockwise.tail)
                record = _train_block(student, i, block, cache, cfg, params, progress, until)
                records.append(record)
                report(record)
                if outer is not None:
                    outer.set_postfix({"block": block.name, "loss": f"{record.loss_after:.4g}"}, refresh=False)
                    outer.update(1)
            _propagate(block, cache, reuse_target=i >= start and cfg.blockwise.target != "student_inputs")
            if i >= start and cfg.checkpoint_path is not None:
                parallel.write_then_wait(lambda: save_blocks(cfg, student, records))
    finally:
        if outer is not None:
            outer.close()


def _share(deadline: float | None, left: int) -> float | None:
    """When a block must stop training: an equal share of the time left for the ``left`` blocks to come."""
    if deadline is None:
        return None
    now = time.perf_counter()
    return now + max(deadline - now, 0.0) / max(left, 1)


def _block_loss(block: Block, cache: BlockCache, j: int) -> Tensor:
    args, kwargs = cache.get_inputs(j)
    out = first_tensor(block.student(*args, **kwargs))
    loss = relative_mse(out, cache.get_target(j), cache.masks[j])
    if cache.extra_targets:
        loss = loss + relative_mse(out, cache.get_extra_target(j), cache.masks[j])
    return loss


def _train_block(student: nn.Module, i: int, block: Block, cache: BlockCache, cfg: RecoveryConfig,
                 params: dict[str, nn.Parameter], progress: bool, until: float | None = None) -> BlockRecord:
    """Targets from the teacher block on the student's inputs, then AdamW on this block's trainable parameters."""
    target = cfg.blockwise.target
    with torch.no_grad():
        for j in range(len(cache)):
            inputs = cache.get_inputs(j)
            own = first_tensor(block.teacher(*inputs[0], **inputs[1])).detach() if target != "teacher_stream" else None
            dense = None
            if target != "student_inputs":  # the dense block on the dense stream, with the same masks / positions
                t_args, t_kwargs = with_stream(inputs, block.slot, cache.get_teacher_stream(j))
                dense = first_tensor(block.teacher(*t_args, **t_kwargs)).detach()
            cache.set_target(j, dense if dense is not None else own)  # type: ignore[arg-type]
            if target == "both":
                cache.set_extra_target(j, own)  # type: ignore[arg-type]
    mine = {id(p) for p in block.student.parameters()}
    chosen = {n: p for n, p in params.items() if id(p) in mine}
    tokens = [int(stream_of(cache.get_inputs(j), block.slot).shape[:-1].numel()) for j in range(len(cache))]
    if not _trains_latent(cfg):
        return fit(student, block.name, i, chosen, lambda j: _block_loss(block, cache, j), tokens, cfg, progress, until)
    # Block-AP: latent weights through fake quantization, re-encoded into the same codes when the block ends
    # (after `fit`'s keep-or-revert rule, so a reverted block re-encodes its original codes)
    with latent_trained(student, block.student, chosen) as latent:
        return fit(student, block.name, i, {**chosen, **latent}, lambda j: _block_loss(block, cache, j), tokens, cfg,
                   progress, until)


def _trains_latent(cfg: RecoveryConfig) -> bool:
    """Whether quantized tensors train their latent weights (``blockwise.quantized``, and factors are trainable)."""
    return cfg.blockwise.quantized == "latent" and "factor" in TRAINED_ROLES[cfg.trainable]


def _train_tail(student: nn.Module, teacher: nn.Module, chain: BlockChain, cache: BlockCache, batches: list[Batch],
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
            cache.set_target(j, teacher_final_stream(teacher, chain, batch.to(device), extra))
    in_blocks = {id(p) for blk in chain.blocks for p in blk.student.parameters()}
    chosen = {n: p for n, p in params.items() if id(p) not in in_blocks}
    kinds: dict[str, str] = {}
    with blocks_skipped(student, chain, tuple_output) as feed, blocks_skipped(teacher, chain, tuple_output) as t_feed:

        def loss(j: int) -> Tensor:
            b = batches[j].to(device)
            with torch.no_grad():
                t_feed.value = cache.get_target(j)
                t, out_kind = model_output(teacher(*b.args, **b.kwargs, **extra))
            feed.value = stream_of(cache.get_inputs(j), last.slot)
            s = model_output(student(*b.args, **b.kwargs, **extra))[0]
            kind = kinds.setdefault("kind", cfg.output_loss if cfg.output_loss != "auto"
                                    else ("mse" if out_kind == "hidden" else "kl"))
            return kl_loss(s, t, cfg.temperature, b.mask) if kind == "kl" else relative_mse(s, t, b.mask)

        tokens = [b.tokens for b in batches]
        return fit(student, f"tail after {last.name}", len(chain.blocks), chosen, loss, tokens, cfg, progress,
                    deadline)


def _propagate(block: Block, cache: BlockCache, reuse_target: bool = False) -> None:
    """The trained block's outputs become the next block's inputs (same masks and position embeddings).

    ``reuse_target``: the block's target is already the dense block on the dense stream (computed by
    `_train_block` for targets ``teacher_stream`` and ``both``), which is the next dense stream: it is
    taken as is instead of running the teacher block again (a replayed block on resume has no target)."""
    with torch.no_grad():
        for j in range(len(cache)):
            inputs = cache.get_inputs(j)
            out = first_tensor(block.student(*inputs[0], **inputs[1])).detach()
            if cache.teacher_streams and reuse_target:
                cache.set_teacher_stream(j, cache.get_target(j))
            elif cache.teacher_streams:
                t_args, t_kwargs = with_stream(inputs, block.slot, cache.get_teacher_stream(j))
                cache.set_teacher_stream(j, first_tensor(block.teacher(*t_args, **t_kwargs)).detach())
            cache.set_inputs(j, with_stream(inputs, block.slot, out))


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
