"""Settings of block-wise reconstruction (`RecoveryConfig.blockwise`), plain pydantic like the recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class BlockwiseConfig(BaseModel):
    """How ``method="blockwise"`` trains each block, caches block inputs, and finishes end to end."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    target: Literal["student_inputs", "teacher_stream", "both"] = "both"
    """What each block is trained to output. ``student_inputs``: the dense block's output on the student's own
    inputs (GPTQ's layer-wise objective: the block behaves like the dense one on what it is fed, but drift
    from earlier blocks is carried on uncorrected); ``teacher_stream``: the dense model's own stream at that
    depth (the dense block on the dense model's inputs, OmniQuant's main target: each block also undoes the
    drift before it); ``both``: the sum of the two losses (OmniQuant's ``aug_loss``). The teacher's stream
    costs one more cached tensor per batch."""
    samples: int = Field(default=32, ge=1)
    """Calibration windows (of the recipe's ``seq_len``) every block is trained on, taken from the data in
    batches of ``batch_size`` (rounded up to whole batches)."""
    epochs: int = Field(default=4, ge=1)
    """Passes over the cached calibration batches per block (one optimizer step per batch)."""
    lr: float = Field(default=1e-3, gt=0)
    """Peak learning rate of AdamW per block (warmup and decay as the recipe's ``schedule``, over the block's
    steps). Higher than end-to-end distillation's: one block's loss is smooth and its inputs are fixed."""
    max_seconds: float | None = Field(default=None, gt=0)
    """Time budget of the block phase (capture, targets, training, propagation; the end-to-end pass has the
    recipe's ``max_seconds``). Each block, the tail included, gets an equal share of what is left when it
    starts (time a block leaves unused goes to the ones after it) and stops its epochs when the share is
    spent; its learning-rate schedule still spans ``samples x epochs``. None: every block runs all its
    steps (deterministic)."""
    cache: Literal["memory", "disk"] = "memory"
    """Where block inputs and the teacher's targets live between blocks: ``memory`` or ``disk`` (files in
    ``cache_dir``, read back batch by batch)."""
    cache_dir: str | None = None
    """Folder for ``cache="disk"`` (None: a temporary folder, removed afterwards)."""
    max_cache_gb: float = Field(default=4.0, gt=0)
    """Largest in-memory cache (GiB); a larger estimate stops before training unless ``cache="disk"``."""
    tail: bool = True
    """After the last block, also train what follows it (final norm, a compressed LM head or decoder) on the
    model's output against the teacher's, with the blocks skipped and the cached final stream fed in."""
    e2e_steps: int = Field(default=0, ge=0)
    """Steps of the short end-to-end distillation pass after the blocks (the recipe's losses); 0: none."""
    e2e_trainable: Literal["norms+biases", "factors", "factors+norms", "factors+norms+biases", "all"] = "norms+biases"
    """Which parameters the end-to-end pass trains (as ``trainable``; ``norms+biases`` trains only those)."""
    e2e_lr: float | None = Field(default=None, gt=0)
    """Peak learning rate of the end-to-end pass (None: the recipe's ``lr``)."""
