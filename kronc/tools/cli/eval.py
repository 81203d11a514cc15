"""``kronc eval``: perplexity, size and latency of MODEL or of a saved compressed model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..report import EVAL, Measurement, size, write_file
from .args import EXIT_OK, positive_int, quiet_arg, threads
from .inputs import resolve_spec
from .measure import measure

HELP = "measure perplexity, size and latency of MODEL or a saved compressed model"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_OR_DIR", help="MODEL, or a folder written by 'kronc compress'")
    p.add_argument("--text", type=Path, metavar="FILE",
                   help="text to measure perplexity on (default: the ABC news text, needs gensim)")
    p.add_argument("--window", type=positive_int, default=512, help="tokens per window (default 512, at most the model's length)")
    p.add_argument("--windows", type=positive_int, default=16, help="windows to score (default 16)")
    p.add_argument("--latency-runs", type=int, default=3, help="timed forward passes, median reported (default 3)")
    p.add_argument("--model", dest="architecture", metavar="MODEL",
                   help="uncompressed architecture of a saved plain model (toy:NAME or package.module:factory)")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    p.add_argument("--no-record", action="store_true", help="do not write eval.json into a saved model's folder")
    quiet_arg(p)


def run(args: argparse.Namespace) -> int:
    resolved = resolve_spec(args.model, architecture=args.architecture)
    record = Path(resolved.spec) / EVAL if resolved.saved and not args.no_record else None
    if record is not None and record.is_symlink():  # refused before measuring, not after
        raise FileExistsError(f"{record} is a symbolic link; kronc does not write through links (remove it, or "
                              "pass --no-record)")
    measured = measure(resolved, args.text, args.window, args.windows, args.latency_runs, progress=not args.quiet)
    plan = getattr(resolved.model, "kronc_plan", None)
    if args.json:
        data: dict[str, Any] = {"model": resolved.spec, "class": type(resolved.model).__name__, "task": resolved.task,
                                **measured.to_json()}
        if plan is not None:
            data.update(bytes_before=plan.bytes_before, bytes_after=plan.bytes_after, ratio=plan.ratio)
        print(json.dumps(data, indent=1))
    else:
        rows = [("model", f"{resolved.spec} ({type(resolved.model).__name__}, {resolved.task})")]
        if measured.perplexity is not None:
            rows.append(("text", f"{measured.text}: {measured.windows} windows of {measured.window} tokens "
                                 f"({measured.tokens} predicted tokens)"))
            rows.append(("perplexity", f"{measured.perplexity:.3f}"))
        elif measured.bits_per_char is not None:
            rows.append(("text", f"{measured.text}: up to {measured.tokens} characters"))
            rows.append(("bits/char", f"{measured.bits_per_char:.3f}"))
        else:
            rows.append(("perplexity", f"n/a ({resolved.task} model)"))
        rows.append(("size", f"{size(measured.stored_bytes)} stored (every tensor)"))
        if plan is not None:
            rows.append(("in-scope", f"{size(plan.bytes_before)} -> {size(plan.bytes_after)} ({plan.ratio:.2f}x)"))
        if measured.latency_s is not None:
            unit = "windows" if resolved.task == "char-lm" else "tokens"
            rows.append(("latency", f"{measured.latency_s * 1e3:.1f} ms per forward of {measured.latency_tokens} {unit} "
                                    f"(median of {args.latency_runs}, {threads()} threads)"))
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
    if record is not None:
        path = record
        write_file(path, lambda tmp: tmp.write_text(json.dumps(Measurement.to_json(measured), indent=1)))
        print(f"recorded in {path}", file=sys.stderr)
    return EXIT_OK
