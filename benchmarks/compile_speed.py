"""Wall time of ``kronc.compile`` on SmolLM2-135M with calibration, and where it goes.

    python benchmarks/compile_speed.py                       # 8x, 8 KJV windows of 512, 1 thread
    python benchmarks/compile_speed.py --profile prof.out    # also a cProfile of the whole call
    python benchmarks/compile_speed.py --plan-out plan.json  # also the plan, to check a change keeps it

Prints the stages `kronc.compile` reports (capture, calibrate, plan, apply) and, with ``--profile``,
the functions with the most cumulative time; writes ``benchmarks/results/compile_speed.{md,json}``.
Calibration is built as `benchmarks/quality.py` builds it (King James text, windows of 512 tokens).
The model and texts are read from the local caches (no downloads).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import kronc  # noqa: E402
from kronc.tools.data import kjv_text  # noqa: E402
from kronc.tools.zoo import load_smollm2  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="8x")
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", type=Path, default=None, help="write a cProfile of the compile call here")
    ap.add_argument("--top", type=int, default=25, help="profile rows to print")
    ap.add_argument("--out", type=Path, default=RESULTS / "compile_speed")
    ap.add_argument("--plan-out", type=Path, default=None, help="also write the plan (JSON) here, to compare runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    window = 512
    ids = tok(kjv_text(max_chars=400_000), return_tensors="pt", add_special_tokens=False).input_ids[0]
    calib = [ids[i * window:(i + 1) * window][None] for i in range(args.calib_windows)]
    prof = cProfile.Profile() if args.profile else None
    t = time.perf_counter()
    if prof:
        prof.enable()
    small, rep = kronc.compile(model, args.budget, calibration=calib, report=True)
    if prof:
        prof.disable()
        prof.dump_stats(str(args.profile))
    wall = time.perf_counter() - t
    stages = {k: round(v, 2) for k, v in rep.seconds.items()}
    plan = rep.plan
    if args.plan_out:
        args.plan_out.write_text(plan.model_dump_json(indent=1) + "\n")
    print(f"kronc.compile(SmolLM2-135M, {args.budget!r}, {len(calib)} windows of {window}): {wall:.1f} s "
          f"(threads {args.threads}); achieved {plan.ratio:.2f}x")
    for k, v in stages.items():
        print(f"  {k:10s} {v:8.2f} s")
    top = ""
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(args.top)
        top = buf.getvalue()
        print(top)
    report = {"command": "python benchmarks/compile_speed.py " + " ".join(os.sys.argv[1:]), "budget": args.budget,
              "calib_windows": args.calib_windows, "threads": args.threads, "torch": torch.__version__,
              "wall_s": round(wall, 2), "stages": stages, "achieved": plan.ratio}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# kronc.compile speed (SmolLM2-135M, calibrated)", "", f"- command: `{report['command']}`",
             f"- budget {args.budget}, {args.calib_windows} King James windows of {window} tokens, "
             f"{args.threads} thread(s), torch {torch.__version__}; achieved {plan.ratio:.2f}x",
             f"- wall time: **{wall:.1f} s**", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in stages.items()]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
