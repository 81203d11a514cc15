"""`distill`: distil the dense teacher back into its compressed student end to end, in place
(`kronc.recover` with ``method="distill"``).

One step, with the scheme hooks in the order `kronc.recover.schemes.base` documents::

    scheme.before_step(step)
    loss = kd·w + hidden·w + lm·w + Σ scheme.penalty(step)
    loss.backward(); scheme.after_backward(step)
    clip gradients; optimizer.step(); schedule.step(); scheme.after_step(step)

``attach`` comes once before the first step and ``finish`` once after the last (also after a NaN stop,
once the student is back at its last good state).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import checkpoint, parallel, sharding
from .batches import Batch, BatchSource, TokenWindows, make_batches, to_batch
from .config import RecoveryConfig, RecoveryError, make_config
from .from_save import SavedStudent
from .guards import check_models, check_schemes, check_windows, device_of, models_restored, seeded
from .losses import Distiller, weighted_total
from .optim import make_optimizer, make_scheduler, trainable_parameters
from .progress import Progress
from .result import RecoveryResult, StepRecord
from .scales import scales_trained


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    cfg: RecoveryConfig,
    *,
    tokenizer: Any = None,
    schemes: Sequence[Any] = (),
    resume: bool | str | Path = False,
    progress: bool = True,
    saved: SavedStudent | None = None,
) -> RecoveryResult:
    """End-to-end knowledge distillation (``method="distill"``), as `kronc.recover` documents; block-wise
    reconstruction calls it for its short end-to-end pass. ``saved``: the meta-device ``student`` is filled from
    its save folder and written to a new one (`kronc.recover.from_save`)."""
    scheme_list, names = check_schemes(schemes)
    check_models(student, teacher)
    shard = cfg.shard and sharding.check_shard(scheme_list)  # FSDP2 over the ranks (False: whole student per rank)
    if cfg.kd == cfg.hidden == cfg.lm == 0:
        raise RecoveryError("every loss weight (kd, hidden, lm) is 0: nothing to train toward")
    batches = make_batches(data, cfg, tokenizer)
    if isinstance(batches, TokenWindows):
        check_windows(student, batches, cfg)
        parallel.check_rows(cfg.batch_size, "batch_size")  # under torch.distributed: equal slices per rank
    with scales_trained(student):  # quantization scales train as fp32 parameters, stored back as fp16
        params = trainable_parameters(student, cfg.trainable)
        if not params:
            raise RecoveryError(f"no trainable parameters: trainable={cfg.trainable!r} selects none of the student's "
                                f"{sum(1 for _ in student.parameters())} parameters (was it compressed with kronc.compile?)")
        snap = _resume_snapshot(resume, cfg, names)
        if cfg.checkpoint_path is not None:
            checkpoint.check_target(cfg.checkpoint_path)  # before any work: never overwrite a user's file
        distiller = Distiller(student, teacher, cfg)
        if cfg.hidden > 0 and not distiller.has_hidden and cfg.kd == cfg.lm == 0:
            distiller.close()
            raise RecoveryError("only the hidden loss has weight, but the models give no hidden states: name hidden_modules")
        try:
            with seeded(cfg.seed, device_of(student)), models_restored(student, teacher), \
                    sharding.sharded_params(student, teacher, batches, params, shard, saved) as trained:
                result = _Run(student, teacher, cfg, batches, scheme_list, names, trained, distiller, progress,
                              shard).run(snap)
            if saved is not None:
                result.saved = str(saved.out)
            return result
        finally:
            distiller.close()


def recovery_losses(student: nn.Module, teacher: nn.Module, batch: Any, config: RecoveryConfig | Mapping[str, Any] | None = None,
                    **overrides: Any) -> dict[str, float]:
    """The loss parts and weighted ``loss`` of ``student`` against ``teacher`` on one held-out ``batch``.

    Both models run in eval mode without gradients (their flags are put back). ``batch`` is what an
    iterable of training batches yields: a ``(batch, seq)`` tensor of ids, a mapping or a tuple.
    """
    cfg = make_config(config, overrides)
    b = batch if isinstance(batch, Batch) else to_batch(batch)
    distiller = Distiller(student, teacher, cfg)
    try:
        with models_restored(student, teacher), torch.no_grad():
            student.eval()
            teacher.eval()
            parts = distiller.losses(b.to(device_of(student)))
            total = weighted_total(parts, cfg)
    finally:
        distiller.close()
    return {"loss": float(total), **{k: float(v) for k, v in parts.items()}}


def _resume_snapshot(resume: bool | str | Path, cfg: RecoveryConfig, names: list[str]) -> checkpoint.Snapshot | None:
    if resume is False or resume is None:
        return None
    if resume is True:
        if cfg.checkpoint_path is None:
            raise RecoveryError("resume=True needs checkpoint_path (or pass the checkpoint file as resume=PATH)")
        if not Path(cfg.checkpoint_path).is_file():
            return None  # nothing written yet: start from the beginning
        return checkpoint.load(cfg.checkpoint_path, cfg, names)
    return checkpoint.load(resume, cfg, names)


class _Run:
    """One call's training loop (the state the steps share)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: RecoveryConfig, batches: BatchSource,
                 schemes: list[Any], names: list[str], params: dict[str, nn.Parameter], distiller: Distiller,
                 progress: bool, sharded: bool = False) -> None:
        self.student, self.teacher, self.cfg, self.batches, self.sharded = student, teacher, cfg, batches, sharded
        self.schemes, self.names, self.distiller, self.show = schemes, names, distiller, progress
        self.device = device_of(student)
        self.on_disk: int | None = None  # step of the checkpoint in checkpoint_path
        chosen = {id(p) for p in params.values()}
        for p in student.parameters():
            p.requires_grad_(id(p) in chosen)
        self.params = list(params.values())
        student.train(cfg.train_mode if cfg.train_mode is not None else bool(schemes))
        teacher.eval()
        for s in schemes:
            s.attach(student, cfg.steps)
        self.optimizer = make_optimizer(student, params, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)

    def snapshot(self, step: int, history: list[StepRecord], seconds: float, tokens: int) -> checkpoint.Snapshot:
        return checkpoint.take_snapshot(step, self.student, self.optimizer, self.scheduler, self.schemes, self.batches,
                                        [r.__dict__ for r in history], seconds, tokens)

    def save(self, snap: checkpoint.Snapshot) -> str | None:
        path = self.cfg.checkpoint_path
        if path is None or not (self.sharded or parallel.is_writer()):
            return None
        self.on_disk = snap.step
        if not self.sharded:
            return str(checkpoint.save(snap, path, self.cfg, self.names))
        whole = sharding.whole_snapshot(snap)  # every rank gathers; rank 0 writes, and its failure reaches the others
        with parallel.shared_failures():
            parallel.write_then_wait(lambda: checkpoint.save(whole, path, self.cfg, self.names))
        return path if parallel.is_writer() else None

    def run(self, resumed: checkpoint.Snapshot | None) -> RecoveryResult:
        cfg = self.cfg
        if resumed is not None and self.sharded:
            resumed = sharding.local_snapshot(resumed, self.student, self.optimizer)  # this rank's shards of the file's
        if resumed is not None:
            checkpoint.restore_all(resumed, self.student, self.optimizer, self.scheduler, self.schemes, self.batches)
        start = resumed.step if resumed else 0
        history = [StepRecord(**h) for h in resumed.history] if resumed else []
        base_seconds, tokens = (resumed.seconds, resumed.tokens) if resumed else (0.0, 0)
        first: checkpoint.Snapshot | None = resumed or self.snapshot(start, history, base_seconds, tokens)
        pending, good = first, None
        done, stopped, call_tokens = start, "steps", 0
        t0 = time.perf_counter()
        with Progress(cfg.steps, start, self.show) as bar:
            if resumed:
                bar.note(f"resumed at step {start}")
            for step in range(start, cfg.steps):
                elapsed = time.perf_counter() - t0
                if cfg.max_seconds is not None and elapsed >= cfg.max_seconds:
                    stopped = "time"
                    break
                if step != start and step % cfg.checkpoint_every == 0:
                    pending = self.snapshot(step, history, base_seconds + elapsed, tokens)
                batch = self.batches.next()
                if batch is None:
                    stopped = "data"
                    break
                fallback = good or first
                assert fallback is not None  # `first` is dropped only once `good` holds a snapshot
                loss, values = self.forward_backward(step, batch.to(self.device), fallback)
                if pending is not None:  # this step's starting state gave a finite loss: it is a good checkpoint
                    good, pending, first = pending, None, None
                    if good is not resumed:
                        self.save(good)
                lr = float(self.optimizer.param_groups[0]["lr"])
                self.optimizer.step()
                self.scheduler.step()
                for s in self.schemes:
                    s.after_step(step)
                tokens += batch.tokens
                call_tokens += batch.tokens
                elapsed = time.perf_counter() - t0
                show = step == start or (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
                metrics = self.metrics() if show else {}
                history.append(StepRecord(step, base_seconds + elapsed, tokens, loss, values, lr, metrics))
                bar.step(step, {"loss": loss, **values, **metrics}, call_tokens / max(elapsed, 1e-9), show)
                done = step + 1
            if stopped != "steps":
                bar.note(f"stopped at step {done}: " + ("max_seconds ran out" if stopped == "time" else "the data ran out"))
            seconds = base_seconds + time.perf_counter() - t0
            written = self.save(self.snapshot(done, history, seconds, tokens)) if cfg.checkpoint_path else None
        self.optimizer.zero_grad(set_to_none=True)  # no gradients left holding memory
        for s in self.schemes:
            s.finish(self.student)
        return RecoveryResult(history, done, stopped, seconds, tokens,  # type: ignore[arg-type]
                              resumed_from=start if resumed else None, checkpoint=written)

    def forward_backward(self, step: int, batch: Batch, fallback: checkpoint.Snapshot) -> tuple[float, dict[str, float]]:
        """Hooks, losses, backward and clipping of one step; a non-finite loss or gradient stops the run."""
        self.optimizer.zero_grad(set_to_none=True)
        error: Exception | None = None
        try:  # this rank's part of the step; a failure is shared with the other ranks before any all_reduce
            for s in self.schemes:
                s.before_step(step)
            parts = self.distiller.losses(parallel.shard(batch))  # this rank's rows (all of them in one process)
            parts.update(self.penalties(step))
            total = weighted_total(parts, self.cfg)
            total.backward()  # a non-finite loss is caught below, before any update
        except Exception as e:
            if self.sharded:  # the other ranks wait inside FSDP2's gathers, not at `agree`: stop this process now
                raise
            error = e
        parallel.agree(error)
        loss, values = parallel.average_values(total, {k: float(v.detach()) for k, v in parts.items()})
        bad = next((k for k, v in values.items() if not math.isfinite(v)), None)
        if bad is not None or not math.isfinite(loss):
            self.fail(step, bad or "total", values.get(bad or "", loss), fallback)
        if not self.sharded:  # FSDP2 averaged the gradients in its reduce-scatter
            parallel.average_gradients(self.params)
        for s in self.schemes:
            s.after_backward(step)
        norm = float(sharding.full_tensor(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or math.inf)))
        if not math.isfinite(norm):
            self.fail(step, "gradients", norm, fallback)
        return loss, values

    def penalties(self, step: int) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, s in zip(self.names, self.schemes, strict=True):
            p = s.penalty(step)
            if p is None:
                continue
            if not isinstance(p, Tensor) or p.numel() != 1:
                what = f"shape {tuple(p.shape)}" if isinstance(p, Tensor) else type(p).__name__
                raise RecoveryError(f"scheme {name}: penalty({step}) must return a one-element tensor or None, got {what}")
            out[f"penalty.{name}"] = p.to(self.device)
        return out

    def metrics(self) -> dict[str, float]:
        return {f"{name}.{k}": float(v) for name, s in zip(self.names, self.schemes, strict=True) for k, v in s.metrics().items()}

    def fail(self, step: int, part: str, value: float, fallback: checkpoint.Snapshot) -> None:
        """Put the student back to ``fallback``, finish the schemes and raise a `RecoveryError`."""
        self.optimizer.zero_grad(set_to_none=True)
        checkpoint.restore_model(fallback, self.student, self.schemes)
        for s in self.schemes:
            s.finish(self.student)
        what = "the gradient norm" if part == "gradients" else f"the {part} loss"
        where = f" (also in {self.cfg.checkpoint_path})" if self.on_disk == fallback.step else ""
        raise RecoveryError(f"{what} became {value} at step {step}: stopped, and the student is back at its state "
                            f"before step {fallback.step}, the last checkpoint with a finite loss{where}; "
                            "lower lr or check the data and schemes", step=step, part=part, restored_step=fallback.step)

