"""``kronc demo``: compress a real model at a few budgets; print size, perplexity and speed; write a report."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

import kronc

from ...api import input_moments, sensitivity
from ...budget import Budget
from ..report import Results, Run, size, write_report
from .args import (
    EXIT_OK,
    UsageError,
    calibration_args,
    kronc_version,
    one_line,
    positive_int,
    quiet_arg,
    say,
    threads,
)
from .inputs import calibration_batches, data_aware, eval_text, resolve_spec
from .measure import measure

HELP = "compress a real model at a few budgets; print size, perplexity and speed; write a report"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="MODEL to compress (default smollm2-135m)")
    p.add_argument("--budgets", default="1.5x,2x,4x", help="comma-separated budgets (default 1.5x,2x,4x)")
    p.add_argument("--policy", "-p", metavar="FILE|NAME", help="policy for every run (its budget is overridden)")
    p.add_argument("--text", type=Path, metavar="FILE", help="evaluation text (default: the ABC news text, needs gensim)")
    p.add_argument("--window", type=positive_int, default=512, help="tokens per window (default 512, at most the model's length)")
    p.add_argument("--windows", type=positive_int, default=8, help="windows scored per model (default 8)")
    p.add_argument("--latency-runs", type=int, default=3, help="timed forward passes, median reported (default 3)")
    p.add_argument("--out", "-o", type=Path, default=Path("kronc-demo"), metavar="DIR",
                   help="folder for results.json and report.png (default kronc-demo)")
    p.add_argument("--save", action="store_true", help="also save every compressed model under --out")
    calibration_args(p)
    quiet_arg(p)


def run(args: argparse.Namespace) -> int:

    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    if not budgets:
        raise UsageError("--budgets is empty", "e.g. --budgets 1.5x,2x,4x")
    budgets = [str(Budget.parse(b)) for b in budgets]
    policy = kronc.load_policy(args.policy) if args.policy else None
    text = eval_text(args.text)
    progress = not args.quiet
    tell = (lambda message: None) if args.quiet else say
    args.out.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails before any model is loaded
    tell(f"kronc demo: loading {args.model}")
    resolved = resolve_spec(args.model, for_compression=True)
    if resolved.task != "causal-lm" or resolved.tokenizer is None:
        raise UsageError(f"the demo measures perplexity: {args.model} is not a causal language model ({resolved.task})",
                         "use a causal LM, e.g. --model smollm2-135m or --model toy:llama")
    calibration = calibration_batches(args, resolved)
    if calibration is not None:
        policy = data_aware(policy, budgets[0])

    tell("measuring the dense model")
    dense = measure(resolved, None, args.window, args.windows, args.latency_runs, progress=progress, text=text)
    tell(f"capturing {type(resolved.model).__name__}")
    captured = kronc.capture(resolved.model, resolved.example_inputs)
    moments = importance = None
    if calibration is not None:  # collected once, used by every budget's plan and fit
        assert policy is not None  # data_aware made one
        say(f"calibrating on {args.calibration}")
        moments = input_moments(captured, policy, calibration, progress=progress)
        importance = sensitivity(captured, policy, calibration, progress=progress)
    info = {"text": dense.text, "window": dense.window, "windows": dense.windows, "tokens": dense.tokens,
            "threads": threads(), "torch": torch.__version__, "kronc": kronc_version(),
            "policy": args.policy, "latency_tokens": dense.latency_tokens, "calibration": args.calibration,
            "calibration_windows": len(calibration or []),
            "calibration_length": int(calibration[0].shape[1]) if calibration else None}
    runs: list[Run] = []
    for budget in budgets:
        say(f"compressing to {budget}")
        t = time.perf_counter()
        the_plan = kronc.plan(captured, policy, budget=budget, moments=moments, importance=importance, progress=progress)
        small = kronc.apply(captured, the_plan, moments=moments, progress=progress)
        seconds = time.perf_counter() - t
        small_resolved = _replace_model(resolved, small)
        measured = measure(small_resolved, None, args.window, args.windows, args.latency_runs, progress=progress,
                            text=text, dense=resolved.model)
        runs.append(Run(budget, the_plan, measured, seconds))
        if args.save:
            small.kronc_policy = (policy or kronc.Policy(budget=budget)).model_copy(update={"budget": Budget.parse(budget)}).model_dump(mode="json")  # type: ignore[assignment]
            kronc.save(small, args.out / f"budget-{budget}", tokenizer=resolved.tokenizer,
                       source=resolved.spec if resolved.kind != "huggingface" else None,
                       example_inputs=resolved.example_inputs)
        del small
        Results(args.model, runs, dense, info).save(args.out / "results.json")  # a later failure keeps this run
    results_path = args.out / "results.json"

    print(f"\n{args.model} ({type(resolved.model).__name__}); perplexity on {dense.text}, {dense.windows} windows of "
          f"{dense.window} tokens ({dense.tokens} predicted tokens); prefill latency of {dense.latency_tokens} tokens, "
          f"median of {args.latency_runs}, each model timed alternately with the dense one; {threads()} threads")
    if calibration:
        print(f"planning: data-aware, calibrated on {args.calibration} ({len(calibration)} windows of "
              f"{calibration[0].shape[1]} tokens)\n")
    else:
        print("planning: weight error only (no calibration; add --calibration kjv for data-aware planning)\n")
    print(_demo_table(runs, dense))
    print(f"\nwrote {results_path}")
    try:
        png = write_report(runs, args.out / "report.png", dense=dense, title=f"kronc demo: {args.model}")
    except ImportError as e:  # MissingPackageError: the table is the main output; the PNG is extra
        print(f"note: {one_line(e)} (skipped report.png)", file=sys.stderr)
    else:
        print(f"wrote {png}")
    return EXIT_OK


def _demo_table(runs: list[Any], dense: Any) -> str:
    head = ("budget", "in-scope size", "ratio", "model size", "perplexity", "vs dense", "prefill", "vs dense", "compress")
    before = runs[0].plan.bytes_before if runs and runs[0].plan else None
    rows = [("dense", size(before), "1.00x", size(dense.stored_bytes), _num(dense.perplexity), "1.00x",
             f"{dense.latency_s * 1e3:.1f}ms", "1.00x", "-")]
    for r in runs:
        m = r.measured
        rows.append((
            r.label, size(r.plan.bytes_after), f"{r.plan.ratio:.2f}x", size(m.stored_bytes), _num(m.perplexity),
            _ratio(m.perplexity, dense.perplexity), f"{m.latency_s * 1e3:.1f}ms",
            _ratio(m.latency_s, m.dense_latency_s or dense.latency_s),
            f"{r.compress_s:.1f}s",
        ))
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*row) for row in rows)]
    return "\n".join(line.rstrip() for line in lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def _replace_model(resolved: Any, model: Any) -> Any:
    return dataclasses.replace(resolved, model=model)
