"""Recovery at a wall-clock budget, with quality measured along the way (shared by the LSTM benchmarks).

``benchmarks/lstm_word_lm.py`` and ``benchmarks/textgenrnn_25x.py`` give every run the same minutes rather
than the same steps: `steps_for` times a few steps on a copy of the student and sets the step count, so the
learning-rate schedule (and overlay annealing) ends when the time does; `Marks` measures quality at chosen
steps from inside `kronc.recover` (a training scheme that only looks); `Clock` keeps the evaluation and the
timing probe out of the minutes; `plot_curves` draws quality against minutes, one line per run.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

import kronc
from kronc.plan import Plan
from kronc.recover.schemes import CoMatrixDropout, OverlayAnnealing, Scheme

Measure = Callable[[nn.Module], float]


class Clock:
    """Training seconds of one run: wall time since it was made, less the time spent measuring."""

    def __init__(self) -> None:
        self.t0, self.paused = time.perf_counter(), 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.t0 - self.paused

    def pause(self, since: float) -> None:
        """Leave the time since ``since`` (a ``perf_counter`` value) out of the training time."""
        self.paused += time.perf_counter() - since

    def mark(self, model: nn.Module, measure: Measure, steps: int, phase: str = "e2e") -> dict[str, Any]:
        """``measure(model)`` (in eval mode; the model's mode is put back) as a curve point, time not counted."""
        seconds, t, was = self.seconds(), time.perf_counter(), model.training
        value = measure(model)
        model.train(was)
        self.pause(t)
        print(f"    {seconds / 60:5.1f} min, {steps} steps ({phase}): {value:.3f}", flush=True)
        return {"seconds": seconds, "steps": steps, "phase": phase, "value": value}


class Marks(Scheme):
    """Quality after the given steps (0-based) of a `kronc.recover` run; changes nothing in training."""

    name = "quality_marks"

    def __init__(self, measure: Measure, steps: set[int], clock: Clock) -> None:
        self.measure, self.steps, self.clock = measure, steps, clock
        self.model: nn.Module | None = None
        self.curve: list[dict[str, Any]] = []

    def attach(self, model: nn.Module, total_steps: int) -> None:
        self.model = model

    def after_step(self, step: int) -> None:
        if step in self.steps and self.model is not None:
            self.curve.append(self.clock.mark(self.model, self.measure, step + 1))


def mark_steps(steps: int, marks: int) -> set[int]:
    """The 0-based steps after which `Marks` measures: ``marks - 1`` evenly spaced (the end is measured apart)."""
    return {round(k * steps / marks) - 1 for k in range(1, marks)}


def steps_for(seconds: float, student: nn.Module, teacher: nn.Module, data: Callable[[int], Any],
              recipe: dict[str, Any], schemes: Callable[[], list[Any]], probe: int = 4) -> int:
    """How many steps fit in ``seconds``: ``probe`` timed steps (after one untimed) on a copy of the student.

    ``data(n)`` gives the training data for ``n`` steps; ``schemes()`` fresh scheme objects for each trial."""
    trial = copy.deepcopy(student)
    kronc.recover(trial, teacher, data(1), **{**recipe, "steps": 1}, schemes=schemes())
    t = time.perf_counter()
    kronc.recover(trial, teacher, data(probe), **{**recipe, "steps": probe}, schemes=schemes())
    per_step = (time.perf_counter() - t) / probe
    print(f"    {per_step:.2f} s per step: {int(seconds / per_step)} steps in {seconds / 60:.1f} min", flush=True)
    return max(1, int(seconds / per_step))


def plot_curves(runs: list[dict[str, Any]], dense: float, path: Path, ylabel: str, title: str,
                log: bool = True) -> None:
    """``value`` against training minutes for every run with a curve; dense and dense + 10% as reference lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for r in runs:
        curve = r.get("curve", [])
        if len(curve) > 2:
            ax.plot([c["seconds"] / 60 for c in curve], [c["value"] for c in curve], marker="o",
                    label=f"{r['method']} [{r['schemes']}]{' lr ' + format(r['lr'], 'g') if 'lr' in r else ''}")
    ax.axhline(dense, color="k", linestyle="--", label=f"dense ({dense:.3g})")
    ax.axhline(1.1 * dense, color="gray", linestyle=":", label="dense + 10% (target)")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("recovery training time, minutes (2-core CPU, shared)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_schemes(schemes: str, plan: Plan) -> list[Any]:
    """The training schemes a run's ``schemes`` label names: ``anneal`` (overlay annealing towards ``plan``'s
    densities) and ``cmr`` (co-matrix dropout, p=0.5)."""
    active: list[Any] = []
    if "anneal" in schemes:
        active.append(OverlayAnnealing(target_density=plan))
    if "cmr" in schemes:
        active.append(CoMatrixDropout(p=0.5))
    return active
