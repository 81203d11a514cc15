"""`recover`: the one entry point of recovery; the recipe's ``method`` picks end-to-end distillation
(`kronc.recover.loop.distill`) or block-wise reconstruction (`kronc.recover.blockwise`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from . import from_save
from .blockwise import reconstruct_blocks
from .config import RecoveryConfig, RecoveryError, make_config
from .guards import check_models
from .loop import distill
from .result import RecoveryResult


def recover(
    student: nn.Module | str | Path,
    teacher: nn.Module,
    data: Any,
    config: RecoveryConfig | Mapping[str, Any] | None = None,
    *,
    tokenizer: Any = None,
    schemes: Sequence[Any] = (),
    resume: bool | str | Path = False,
    progress: bool = True,
    out: str | Path | None = None,
    **overrides: Any,
) -> RecoveryResult:
    """Train the compressed ``student`` toward the dense ``teacher`` by knowledge distillation, in place.

    ``student`` is the model `kronc.compile` returned (a compressed copy that never shares tensors
    with the dense model); its parameters selected by ``trainable`` are updated where they are. The
    ``teacher`` is never modified: it runs in eval mode without gradients, and every module's training
    flag (and the student's ``requires_grad`` flags) are put back afterwards.

    ``data`` is a ``str`` of text (with ``tokenizer``), a 1-D tensor of token ids, or an iterable of
    batches (see `kronc.recover.batches`). ``config`` is a `RecoveryConfig` (or a dict of its fields);
    keyword ``overrides`` (``steps=100, lr=1e-3``) replace single fields. ``schemes`` take part
    through the `Scheme` hooks. ``resume=True`` continues from ``config.checkpoint_path`` when that file
    exists (a path: from that file), giving the same weights as a run never interrupted.

    ``method="blockwise"`` (in ``config``) reconstructs one block at a time instead and returns a
    `kronc.recover.blockwise.BlockwiseResult` (see that module).

    Under ``torch.distributed`` (``torchrun``) the ranks split every batch's rows; ``shard=True`` also shards
    the student's parameters, gradients and optimizer state over them with FSDP2
    (`kronc.recover.sharding`), and hands the student back whole on every rank. A ``student`` given as a kronc save
    folder (or loaded with ``kronc.load(folder, device="meta")``) never exists whole on one rank: each rank reads only
    its shards from the folder, and the recovered student is written to the new save folder ``out`` block by block
    (``result.saved``; `kronc.recover.from_save`).

    Raises `RecoveryError` before training for unusable data, mismatched models or nothing to train,
    and during training when a loss part turns NaN/inf: the student is then put back to the last
    checkpoint whose loss was finite, and the error names the step and the part.
    """
    cfg = make_config(config, overrides)
    if from_save.is_unbuilt(student):
        student, saved = from_save.open_saved(student, out, shard=cfg.shard, method=cfg.method)
        return distill(student, teacher, data, cfg, tokenizer=tokenizer, schemes=schemes, resume=resume, progress=progress,
                       saved=saved)
    if out is not None:
        raise RecoveryError("out= is for a student given as a save folder; save a built student with kronc.save")
    if not isinstance(student, nn.Module):
        check_models(student, teacher)  # the usual one-line error for a student that is not a model
        raise AssertionError("unreachable")
    if cfg.method == "blockwise":
        if schemes:
            raise RecoveryError("method='blockwise' takes no schemes: run them in a method='distill' call afterwards")
        return reconstruct_blocks(student, teacher, data, cfg, tokenizer=tokenizer, resume=resume, progress=progress)
    return distill(student, teacher, data, cfg, tokenizer=tokenizer, schemes=schemes, resume=resume, progress=progress)
