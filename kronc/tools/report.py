"""Results of compression runs: what was measured, where it is stored, and the report PNG.

A *run* is one compressed model: its plan and, when it was evaluated, its quality, size and
latency. Runs are read from

* a folder written by `kronc.save` / ``kronc compress`` (``kronc.json``, plus ``eval.json`` once
  ``kronc eval`` has measured it);
* a ``results.json`` written by ``kronc demo`` (several budgets of one model, and the dense model).

`write_report` draws, for every run, each site's compression ratio (bars coloured by format) and
estimated error, and, when at least two runs carry a quality measure, quality against in-scope
size with the dense model for reference. It needs ``matplotlib`` (an optional dependency).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..plan import Decision, Plan
from ..serialize import read_manifest
from ..serialize import stored_bytes as _stored
from ..values import Precision
from .zoo import MissingPackageError

RESULTS = "results.json"
EVAL = "eval.json"
REPORT = "report.png"
MATPLOTLIB_PIP = "pip install matplotlib"
RESULTS_VERSION = 1

class ResultsError(ValueError):
    """A folder or file holds no runs kronc can read (no kronc.json, no results.json)."""


FORMAT_COLORS = {
    "dense": "#9e9e9e",
    "lowrank": "#1f77b4",
    "kronecker": "#2ca02c",
    "doped": "#d62728",
    "blocksparse": "#9467bd",
}


@dataclass
class Measurement:
    """What one evaluation of a model found. Sizes in bytes, latency in seconds."""

    perplexity: float | None = None
    bits_per_char: float | None = None
    """Character LMs (textgenrnn) instead of perplexity."""
    tokens: int | None = None
    windows: int | None = None
    window: int | None = None
    text: str | None = None
    latency_s: float | None = None
    latency_tokens: int | None = None
    dense_latency_s: float | None = None
    """The dense model's latency, timed alternately with this one (the fair reference for a ratio)."""
    stored_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Any, where: str = "the measurement") -> Measurement:
        """A measurement from its JSON object; `ResultsError` naming ``where`` and the key when a value is wrong."""
        if not isinstance(data, dict):
            raise ResultsError(f"{where} is a JSON {type(data).__name__}, not an object of measurements")
        values = {k: data.get(k) for k in cls.__dataclass_fields__}
        for key, value in values.items():
            if value is None:
                continue
            if key == "text":
                if not isinstance(value, str):
                    raise ResultsError(f"{where}: {key} is {value!r}, not a string")
            elif isinstance(value, bool) or not isinstance(value, int | float) or value < 0:  # inf/nan: a diverged model
                raise ResultsError(f"{where}: {key} is {value!r}, not a number of at least 0")
        return cls(**values)


@dataclass
class Run:
    """One compressed model: its label (usually the budget), plan and measurement."""

    label: str
    plan: Plan | None = None
    measured: Measurement = field(default_factory=Measurement)
    compress_s: float | None = None

    @property
    def bytes_before(self) -> int | None:
        return self.plan.bytes_before if self.plan else None

    @property
    def bytes_after(self) -> int | None:
        return self.plan.bytes_after if self.plan else None

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label, "compress_s": self.compress_s, "measured": self.measured.to_json(),
            "plan": self.plan.model_dump(mode="json") if self.plan else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "the run") -> Run:
        plan = Plan.model_validate(data["plan"]) if data.get("plan") else None
        measured = Measurement.from_json(data.get("measured") or {}, f"{where}.measured")
        return cls(str(data.get("label", "?")), plan, measured, data.get("compress_s"))


@dataclass
class Results:
    """Runs of one model (several budgets) and the dense reference, as ``kronc demo`` writes them."""

    model: str
    runs: list[Run]
    dense: Measurement | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = {"kind": "kronc-results", "version": RESULTS_VERSION, "model": self.model, "info": self.info,
                "dense": self.dense.to_json() if self.dense else None, "runs": [r.to_json() for r in self.runs]}
        write_file(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Results:
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ResultsError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(data, dict) or data.get("kind") != "kronc-results":
            raise ResultsError(f"{path} is not a kronc results file (written by kronc demo)")
        dense = Measurement.from_json(data["dense"], f"{path}: dense") if data.get("dense") else None
        runs_data = data.get("runs", [])
        if not isinstance(runs_data, list):
            raise ResultsError(f"{path}: runs is a JSON {type(runs_data).__name__}, not a list")
        runs = []
        for i, r in enumerate(runs_data):
            if not isinstance(r, dict):
                raise ResultsError(f"{path}: runs[{i}] is a JSON {type(r).__name__}, not an object")
            try:
                runs.append(Run.from_json(r, f"{path}: runs[{i}]"))
            except (TypeError, ValueError) as e:  # pydantic's ValidationError is a ValueError
                if isinstance(e, ResultsError):
                    raise
                raise ResultsError(f"{path}: runs[{i}] cannot be read: {str(e).strip().splitlines()[0]}") from e
        info = data.get("info") or {}
        return cls(str(data.get("model", "?")), runs, dense, info if isinstance(info, dict) else {})


# --------------------------------------------------------------------------- measuring


def measure_latency(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls, under inference mode."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_latency_pair(a: Callable[[], Any], b: Callable[[], Any], repeats: int = 3,
                         warmup: int = 1) -> tuple[float, float]:
    """Median seconds of ``a()`` and of ``b()``, timed alternately so that machine load hits both alike."""
    with torch.inference_mode():
        for _ in range(warmup):
            a()
            b()
        ta, tb = [], []
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            a()
            ta.append(time.perf_counter() - t)
            t = time.perf_counter()
            b()
            tb.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def stored_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor the model stores (tied tensors once)."""
    return _stored(model)


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{int(n)}B"


# --------------------------------------------------------------------------- reading runs


def read_runs(paths: Sequence[str | Path]) -> tuple[list[Run], Measurement | None, str]:
    """Runs from kronc save folders and ``results.json`` files/folders; the dense reference if any; a title."""
    runs: list[Run] = []
    dense: Measurement | None = None
    titles: list[str] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        if p.is_file() and p.name == "kronc.json":
            p = p.parent
        if not (p / "kronc.json").is_file():
            results = p / RESULTS if p.is_dir() else p
            if not results.is_file():
                raise ResultsError(f"{p} is neither a kronc save folder (kronc.json) nor holds a {RESULTS} from kronc demo")
            r = Results.load(results)
            runs += r.runs
            dense = dense or r.dense
            titles.append(r.model)
            continue
        manifest = read_manifest(p)
        plan = Plan.model_validate(manifest["plan"])
        measured = Measurement()
        if (p / EVAL).is_file():
            measured = Measurement.from_json(_read_json(p / EVAL), str(p / EVAL))
        label = str(plan.budget) if plan.budget is not None else p.name
        runs.append(Run(label if len(paths) == 1 else f"{p.name} ({label})", plan, measured))
        titles.append(manifest.get("source") or p.name)
    if not runs:
        raise ResultsError("no runs found in " + ", ".join(map(str, paths)))
    title = ", ".join(dict.fromkeys(t for t in titles if t))
    return runs, dense, title


def _read_json(path: Path) -> Any:
    """The JSON in ``path``; `ResultsError` naming the file when it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path} is not valid JSON: {e}") from e


# --------------------------------------------------------------------------- the PNG


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or `MissingPackageError` naming the pip command."""
    try:
        import matplotlib
    except ImportError as e:
        raise MissingPackageError(f"the report PNG needs matplotlib, which is not installed; run: {MATPLOTLIB_PIP}") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(runs: Sequence[Run], out: str | Path, *, dense: Measurement | None = None, title: str = "") -> Path:
    """Draw per-site formats and errors for every run (and quality against size for several) into ``out``."""
    plt = require_matplotlib()
    with_plan = [r for r in runs if r.plan is not None and r.plan.decisions][:8]
    quality = [r for r in runs if r.measured.perplexity is not None and r.bytes_after is not None]
    show_quality = len(quality) >= 2 or (len(quality) == 1 and dense is not None and dense.perplexity is not None)
    panels = len(with_plan) + (1 if show_quality else 0)
    if panels == 0:
        raise ResultsError("nothing to draw: the runs have no plans and no quality measurements")
    width = max(8.0, min(22.0, 4.0 + 0.12 * max((len(r.plan.decisions) for r in with_plan), default=0)))  # type: ignore[union-attr]
    fig, axes = plt.subplots(panels, 1, figsize=(width, 3.4 * panels), squeeze=False)
    for ax, run in zip(axes[:, 0], with_plan, strict=False):
        _site_panel(ax, run)
    if show_quality:
        _quality_panel(axes[-1, 0], quality, dense)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_file(out, lambda tmp: fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".").lower() or "png"))
    finally:
        plt.close(fig)
    return out


def write_file(path: Path, write: Callable[[Path], Any]) -> None:
    """Let ``write`` fill a temporary file beside ``path``, then move it into place.

    Why: a results folder may be shared or planted, and ``report.png`` or ``eval.json`` there may be
    a symbolic link to someone's file; writing through it would overwrite that file. A link is
    refused, and the move replaces the name only, so an interrupted write leaves the old file whole.
    """
    if path.is_symlink():
        raise FileExistsError(f"{path} is a symbolic link; kronc does not write through links (remove it first)")
    tmp = path.with_name(f".{path.name}.kronc-{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def value_bits(d: Decision) -> float:
    """Bits per stored value of a decision: its precision's (``int4g32``: 4; a quantized base plus
    correction: the base's), or the weight's own (bytes before over entries) when it keeps them."""
    p = d.spec.precision
    if p is None:
        p = getattr(d.spec, "base", None) if isinstance(getattr(d.spec, "base", None), Precision) else None
    if p is not None:
        return float(p.bits)
    return 8.0 * d.bytes_before / max(1, d.shape[0] * d.shape[1])


def site_panel_data(run: Run) -> list[dict[str, Any]]:
    """What a run's site panel draws, one entry per site: name, format, compression, bits per stored
    value (`value_bits`), the precision's name and the estimated error."""
    assert run.plan is not None
    return [{"site": d.site, "kind": d.spec.kind, "ratio": d.ratio, "bits": value_bits(d), "values": d.values,
             "error": d.error} for d in run.plan.decisions]


def _site_panel(ax: Any, run: Run) -> None:
    plan = run.plan
    assert plan is not None
    ds = plan.decisions
    data = site_panel_data(run)
    x = list(range(len(ds)))
    ratios = [d.ratio for d in ds]
    colors = [FORMAT_COLORS.get(d.spec.kind, "#ff7f0e") for d in ds]
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    bars = ax.bar(x, [max(r - 1.0, 0.0) for r in ratios], color=colors, width=0.85, bottom=1.0)
    bits = [row["bits"] for row in data]
    for bar, b in zip(bars, bits, strict=True):  # fewer bits: a lighter bar, and the bit width above it
        bar.set_alpha(0.35 + 0.65 * min(1.0, b / 16))
    if len(set(bits)) > 1 or any(row["values"] != "keep" for row in data):
        for i, (r, b) in enumerate(zip(ratios, bits, strict=True)):
            ax.annotate(f"{b:g}", (i, max(r, 1.0)), textcoords="offset points", xytext=(0, 1), ha="center",
                        fontsize=5 if len(ds) > 40 else 7)
    ax.set_yscale("log")
    ax.set_ylim(1.0, max(2.0, max(ratios) ** 1.25))  # headroom for the legend
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("compression (site)")
    ax.set_xlim(-0.6, len(ds) - 0.4)
    ax.set_title(f"{run.label}: in-scope {size(plan.bytes_before)} -> {size(plan.bytes_after)} ({plan.ratio:.2f}x)",
                 fontsize=10)
    errors = [(i, d.error) for i, d in enumerate(ds) if d.error is not None]
    if errors:
        twin = ax.twinx()
        twin.plot([i for i, _ in errors], [e for _, e in errors], "k.", markersize=5, label="estimated error")
        twin.set_ylabel("relative error")
        twin.set_ylim(0, max(0.05, 1.1 * max(e for _, e in errors)))
    step = max(1, math.ceil(len(ds) / 40))
    ax.set_xticks(x[::step])
    ax.set_xticklabels([_short(d.site) for d in ds][::step], rotation=90, fontsize=6)
    kinds = list(dict.fromkeys(d.spec.kind for d in ds))
    handles = [plt_patch(FORMAT_COLORS.get(k, "#ff7f0e"), k) for k in kinds]
    counts = {b: bits.count(b) for b in sorted(set(bits))}
    handles.append(plt_patch("#ffffff", "bits/value: " + ", ".join(f"{b:g} ({n})" for b, n in counts.items())))
    if errors:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="k", marker=".", linestyle="", label="estimated error"))
    ax.legend(handles=handles, fontsize=7, loc="upper right", ncol=min(6, len(handles)))


def plt_patch(color: str, label: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(color=color, label=label)


def _quality_panel(ax: Any, runs: Sequence[Run], dense: Measurement | None) -> None:
    xs = [r.bytes_after / 1e6 for r in runs]  # type: ignore[operator]
    ys = [r.measured.perplexity for r in runs]
    order = sorted(range(len(runs)), key=lambda i: xs[i])
    ax.plot([xs[i] for i in order], [ys[i] for i in order], "o-", color="#1f77b4", label="compressed")
    for i in order:
        ax.annotate(runs[i].label, (xs[i], ys[i]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    before = next((r.bytes_before for r in runs if r.bytes_before), None)
    if dense is not None and dense.perplexity is not None and before:
        ax.plot([before / 1e6], [dense.perplexity], "*", color="k", markersize=12, label="dense")
        ax.axhline(dense.perplexity, color="k", linewidth=0.6, linestyle=":")
    values = [y for y in ys if y] + ([dense.perplexity] if dense is not None and dense.perplexity else [])
    if values and max(values) / min(values) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("in-scope weights (MB)")
    ax.set_ylabel("perplexity")
    text = runs[0].measured.text
    ax.set_title("quality against size" + (f" ({text})" if text else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _short(site: str) -> str:
    name = site.removesuffix(".weight")
    for prefix in ("model.layers.", "transformer.h.", "encoder.layer.", "model.", "transformer."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


__all__ = [
    "EVAL", "REPORT", "RESULTS", "Measurement", "Results", "ResultsError", "Run", "measure_latency", "measure_latency_pair", "read_runs",
    "require_matplotlib",
    "site_panel_data", "size", "stored_bytes", "value_bits", "write_report",
]
