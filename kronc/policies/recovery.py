"""The recovery recipe: how `kronc.recover` distils the dense teacher into the compressed student.

Plain data (pydantic, no torch at import), so a policy file can carry it under ``recovery:`` and the
JSON schema documents it. Every number has a default that works on the toy models and is a sane
start for real ones (AdamW, lr 3e-4, 5% linear warmup then cosine decay to zero).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Trainable = Literal["factors", "factors+norms", "factors+norms+biases", "scales+norms+biases", "norms+biases", "all"]
"""Which student parameters train: the compressed formats' own tensors (low-rank ``u, v``, Kronecker
``a, b``, overlay ``values``, block-sparse ``blocks``, and the dense matrices kept inside compressed
LSTMs), plus normalisation weights, plus biases, or every parameter (``norms+biases``: those only)."""


class RecoveryError(ValueError):
    """Recovery cannot start or cannot go on: bad data, mismatched models, or a loss that became NaN/inf.

    ``step`` and ``part`` name where a non-finite loss appeared (None for problems found before training);
    ``restored_step`` is the step whose starting state the student was put back to.
    """

    def __init__(self, message: str, *, step: int | None = None, part: str | None = None,
                 restored_step: int | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.part = part
        self.restored_step = restored_step


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
    quantized: Literal["latent", "scales"] = "scales"
    """How a block's integer-quantized tensors train when ``trainable`` includes factors. ``latent``
    (EfficientQAT's Block-AP, OmniQuant): continuous latent weights train through fake quantization
    (rounding with a straight-through estimator) together with the group scales and minima (learnable
    clipping); at the block's end they are re-encoded with the trained scales into the same packed codes
    (same precision, same bytes), and the next block is fed the re-encoded block's outputs. ``scales``:
    the integer codes stay frozen and only the scales and minima train (the default: with the tens of
    steps a block gets on a CPU, ``latent`` gained little on SmolLM2's first blocks, 157.0 -> 156.7
    perplexity, and on a 10x toy Llama it raised a block's loss, which then kept its initial weights)."""
    latent_lr: float = Field(default=0.02, gt=0)
    """Peak AdamW learning rate of the latent weights of ``quantized="latent"``, in grid steps (the latent
    weights are held in units of their group's starting scale, so one rate fits every tensor). Blocks get
    tens of steps on a CPU, and Adam moves every latent value about this much per step whatever its
    gradient: 0.05 flipped enough codes to raise the loss of a toy Llama block and of SmolLM2's first
    blocks; 0.02 gave slightly lower block losses than frozen codes on both."""
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
    e2e_trainable: Literal["scales+norms+biases", "norms+biases", "factors", "factors+norms", "factors+norms+biases",
                           "all"] = "scales+norms+biases"
    """Which parameters the end-to-end pass trains (as ``trainable``): by default the quantization scales
    (of integer-quantized values; none otherwise), norms and biases, as EfficientQAT's second phase."""
    e2e_lr: float | None = Field(default=None, gt=0)
    """Peak learning rate of the end-to-end pass (None: the recipe's ``lr``)."""


class RecoveryConfig(BaseModel):
    """How to train a compressed model back toward its dense teacher (knowledge distillation)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    method: Literal["distill", "blockwise"] = "distill"
    """``distill``: end-to-end knowledge distillation; ``blockwise``: reconstruct one block at a time against
    the dense block's output (settings in ``blockwise``), then optionally a short end-to-end pass
    (``max_seconds`` bounds only that pass; the block phase runs ``samples x epochs`` per block, or
    until ``blockwise.max_seconds``)."""
    blockwise: BlockwiseConfig = Field(default_factory=BlockwiseConfig)
    """Settings of ``method="blockwise"``."""
    steps: int = Field(default=200, ge=1)
    """Optimizer steps to run (the learning-rate schedule spans this many, even when ``max_seconds``
    stops training earlier)."""
    max_seconds: float | None = Field(default=None, gt=0)
    """Time budget in seconds for one `recover` call: no step starts after it has passed (the last
    step may end a little later). None: no time limit."""
    lr: float = Field(default=3e-4, gt=0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay, applied to the trained matrices and factors but never to norms or biases."""
    warmup: float = Field(default=0.05, ge=0, lt=1)
    """Fraction of ``steps`` over which the learning rate rises linearly from zero to ``lr``."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup: ``cosine`` or ``linear`` to zero at ``steps``, or ``constant``."""
    grad_clip: float = Field(default=1.0, ge=0)
    """Largest global gradient norm (gradients are scaled down to it); 0 turns clipping off."""
    batch_size: int = Field(default=8, ge=1)
    """Windows per step when training on a text or a token stream."""
    seq_len: int = Field(default=128, ge=2)
    """Tokens per window fed to the models (each window takes ``seq_len + 1`` tokens of the stream so the
    language-model loss has a target for every position)."""
    kd: float = Field(default=1.0, ge=0)
    """Weight of the output distillation loss: KL divergence between teacher and student token
    distributions at ``temperature`` (scaled by temperature², as Hinton et al.), or, for models whose
    output is not logits, the relative mean squared error of the outputs."""
    hidden: float = Field(default=1.0, ge=0)
    """Weight of intermediate-layer distillation (KnGPT2's ILKD): mean over matched layers of the squared
    error of student against teacher hidden states divided by the teacher's mean square (scale-free).
    Hugging Face models give their hidden states; other models need ``hidden_modules``, else this term
    is left out."""
    lm: float = Field(default=0.0, ge=0)
    """Weight of the plain language-model loss (next-token cross-entropy on the training tokens)."""
    temperature: float = Field(default=2.0, gt=0)
    """Softmax temperature of the distillation KL term."""
    output_loss: Literal["auto", "kl", "mse"] = "auto"
    """How the ``kd`` term compares outputs: ``kl`` (logits), ``mse`` (relative squared error, for hidden
    states or regression outputs) or ``auto``: ``mse`` when the model returns ``last_hidden_state``
    without ``logits``, else ``kl``."""
    hidden_modules: list[str | tuple[str, str]] = Field(default_factory=list)
    """Modules whose outputs are matched for the ``hidden`` term, as ``"name"`` (same name in teacher and
    student, as after a module swap) or ``[teacher_name, student_name]``. Empty: the Hugging Face hidden
    states when the model returns them."""
    trainable: Trainable = "factors+norms+biases"
    """Which student parameters train: ``factors`` (the compressed formats' tensors only, with the
    quantization scales of integer-quantized ones; their codes stay), ``factors+norms``,
    ``factors+norms+biases``, ``scales+norms+biases`` (no factor values) or ``all``. The others stay frozen."""
    train_mode: bool | None = None
    """Run the student in training mode (True: dropout active, as in ordinary fine-tuning) or eval mode
    (False: no dropout noise against the teacher's exact outputs, better for short recoveries). None:
    training mode when schemes are given (some act only in training mode), else eval mode. The teacher
    is always in eval mode."""
    seed: int = 0
    """Seed of everything random in a run (window order, dropout): the same seed gives the same weights."""
    log_every: int = Field(default=10, ge=1)
    """Steps between progress updates (the history records every step)."""
    checkpoint_every: int = Field(default=50, ge=1)
    """Steps between checkpoints. Each is kept in memory (a loss turning NaN/inf puts the student back to
    the last one whose loss was finite) and, with ``checkpoint_path``, written to disk."""
    shard: bool = False
    """Under ``torch.distributed`` (``torchrun``), shard the student's parameters, gradients and AdamW state over
    the ranks with FSDP2 (``fully_shard`` per block, then the whole model), so each rank holds about ``1/world``
    of them; False: every rank holds the whole student (data-parallel). Needs a process group (one rank:
    unsharded), takes no schemes, and applies to end-to-end distillation (block-wise: its end-to-end pass).
    The student comes back an ordinary model, and checkpoints hold whole tensors either way."""
    checkpoint_path: str | None = None
    """File to write checkpoints to (student, optimizer, schedule, RNG, scheme states, step); also
    written when training ends, and what ``recover(..., resume=True)`` continues from."""
