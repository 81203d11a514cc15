"""What `kronc.recover` returns: per-step history and how the run ended."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Stopped = Literal["steps", "time", "data"]


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step."""

    step: int
    """0-based index of the step."""
    seconds: float
    """Training seconds since the run began (summed over resumed calls) when the step ended."""
    tokens: int
    """Input tokens trained on so far, this step included."""
    loss: float
    """The weighted total loss the step minimised."""
    parts: dict[str, float]
    """Unweighted loss parts: ``kd``, ``hidden``, ``lm`` and ``penalty.<scheme>``."""
    lr: float
    """Learning rate the step used."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Scheme metrics (``<scheme>.<name>``), recorded on progress-update steps."""


@dataclass
class RecoveryResult:
    """The history of a recovery run (over every resumed call) and why it stopped."""

    history: list[StepRecord]
    steps: int
    """Steps done so far (the index of the next step)."""
    stopped: Stopped
    """``steps``: all configured steps ran; ``time``: ``max_seconds`` ran out; ``data``: a one-shot iterable
    of batches ran out."""
    seconds: float
    """Training seconds, summed over resumed calls."""
    tokens: int
    """Input tokens trained on."""
    resumed_from: int | None = None
    """The step this call continued from, when it resumed a checkpoint."""
    checkpoint: str | None = None
    """The checkpoint file written at the end, if any."""
    saved: str | None = None
    """The save folder the recovered student was written to (a student recovered from its save folder), else None."""

    @property
    def final_loss(self) -> float | None:
        return self.history[-1].loss if self.history else None

    def series(self, key: str = "loss") -> list[float]:
        """``loss`` or one loss part (``kd``, ``hidden``, ``lm``, ``penalty.<scheme>``) per step, for plots."""
        if key == "loss":
            return [r.loss for r in self.history]
        return [r.parts[key] for r in self.history if key in r.parts]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        last = f", final loss {self.final_loss:.4g}" if self.history else ""
        return (f"recovery: {self.steps} steps ({self.stopped}), {self.tokens} tokens in {self.seconds:.1f}s{last}")
