"""Recovery on SmolLM2-135M: a compression plan, then distillation for a fixed CPU time per budget.

    python benchmarks/recovery.py --budgets 4x,10x,25x --lr 5e-5 --minutes 15 --segments 3
    python benchmarks/recovery.py --budgets 2x --methods kngpt2,asvd --lr 1e-4 --minutes 6 --segments 2 --out kngpt2
    python benchmarks/recovery.py --budgets 10x --recovery distill,blockwise --minutes 20 --segments 4 --out blockwise

For each budget of the decoder linears (q, k, v, o, gate, up, down of all 30 layers; embeddings and
the tied LM head dense) and each method (``--methods``: ``kronc``, what a user gets from
``kronc.compile(model, budget, calibration=...)``: the default policy (every format and precision), the
data-aware objective, input moments from every calibration window and Fisher sensitivity from the first
2, as ``benchmarks/quality.py``'s ``kronc@<budget>`` rows;
``kngpt2``, every linear one Kronecker product ``A ⊗ B`` with an ``A`` of 2 or 4 values (2x or 4x
smaller, as KnGPT2 compresses GPT-2; the solver picks per linear), initialised by the nearest-Kronecker (Van Loan-Pitsianis) fit; ``kronecker``,
every linear the Kronecker sum with the least error at the same ratio (at 2x: 82-234 terms of
balanced factors, 8.5-12x the dense FLOPs, too slow to train here); ``svd`` / ``asvd``, every linear low rank at the same
ratio, plain or activation-aware; calibration: the first ``--calib-windows`` windows of 512 King James
tokens, training text the rest), then
`kronc.recover` for ``--minutes`` of training on King James text (logit KL at T=2 plus
intermediate-layer distillation of every decoder layer's hidden state, factors + norms + biases
trained, AdamW at a constant ``--lr``, ``--batch`` windows of ``--seq-len`` tokens per step). The run is
cut into ``--segments`` equal time slices, resumed from its checkpoint each time, and perplexity on the
ABC news text (first ``--windows`` windows of 512 tokens) is measured after each slice (evaluation time
is not counted in the budget), giving perplexity against training time.

``--recovery`` picks how the minutes are spent, from the same compressed student: ``distill`` (the above,
the default) and ``blockwise``: first block-wise reconstruction (`kronc.recover(method="blockwise")`,
``--bw-samples`` KJV windows, ``--bw-epochs``, AdamW at ``--bw-lr``, teacher-stream + own-input targets,
quantized tensors as ``--bw-quantized``: ``latent`` weights through fake quantization plus scales (Block-AP,
the default) or ``scales`` only)
for ``--block-share`` of the minutes (rounded to whole segments, at least one; ``blockwise.max_seconds``
splits it equally over the 30 layers and the tail), then, in the remaining segments, the same end-to-end
distillation training quantization scales, norms and biases only (at ``--e2e-lr``). Perplexity is measured at the same
minute marks; "tokens" of the block phase are the windows each block trained on (x epochs), the tokens
that went through every block. Writes
``benchmarks/results/<--out>.{md,json,png}``; ``--render`` rewrites the markdown and plot from the JSON;
``--minutes 0`` compresses and measures the training-free perplexity only (nothing is written).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import kronc
from kronc.plan import Plan
from kronc.planning import collect_input_moments, uniform_plan
from kronc.policies import Policy, resolve
from kronc.tools.data import abc_news_text, kjv_text
from kronc.tools.evaluate import perplexity
from kronc.tools.zoo import load_smollm2

RESULTS = Path(__file__).parent / "results"
RECOVERY = {"distill": "end-to-end distillation", "blockwise": "block-wise, then scales+norms+biases end to end"}
METHODS = {"kronc": "kronc plan", "kngpt2": "Kronecker, one term, A of 2-4 values (KnGPT2)",
           "kronecker": "Kronecker sum (uniform)", "svd": "low rank, SVD (uniform)",
           "asvd": "low rank, activation-aware SVD (uniform)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="4x,10x,25x")
    ap.add_argument("--minutes", type=float, default=6.0, help="training time per budget")
    ap.add_argument("--segments", type=int, default=3, help="perplexity checkpoints along the run")
    ap.add_argument("--windows", type=int, default=4, help="ABC news windows of 512 tokens for perplexity")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--methods", default="kronc", help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--out", default="recovery", help="results file name under benchmarks/results/")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown and plot from the JSON")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-windows", type=int, default=8, help="King James windows of 512 tokens for planning")
    ap.add_argument("--recovery", default="distill", help=f"comma-separated subset of {','.join(RECOVERY)}")
    ap.add_argument("--block-share", type=float, default=0.5, help="blockwise: share of --minutes for the block phase")
    ap.add_argument("--bw-samples", type=int, default=16, help="blockwise: calibration windows of --seq-len")
    ap.add_argument("--bw-epochs", type=int, default=4, help="blockwise: passes over them per block")
    ap.add_argument("--bw-lr", type=float, default=1e-3, help="blockwise: peak AdamW lr per block")
    ap.add_argument("--bw-quantized", default="latent", choices=["latent", "scales"],
                    help="blockwise: quantized tensors train latent weights + scales (Block-AP) or scales only")
    ap.add_argument("--bw-latent-lr", type=float, default=None, help="blockwise: latent weights' lr (grid steps)")
    ap.add_argument("--e2e-lr", type=float, default=None, help="blockwise: lr of the end-to-end pass (default --lr)")
    args = ap.parse_args()
    if args.render:
        record = json.loads((RESULTS / f"{args.out}.json").read_text())
        write(record, args.out)
        return
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown --methods {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    recoveries = args.recovery.split(",")
    unknown = sorted(set(recoveries) - set(RECOVERY))
    if unknown:
        ap.error(f"unknown --recovery {', '.join(unknown)}; choose from {', '.join(RECOVERY)}")
    if args.minutes < 0 or args.calib_windows < 1:
        ap.error("--minutes must be >= 0 and --calib-windows >= 1")
    if "blockwise" in recoveries and args.minutes > 0 and (args.segments < 2 or not 0 < args.block_share < 1):
        ap.error("--recovery blockwise needs --segments >= 2 and 0 < --block-share < 1 (time is left for the e2e pass)")
    torch.set_num_threads(args.threads)

    model, tok = load_smollm2()
    text = abc_news_text()
    kjv = tok(kjv_text(max_chars=3_000_000), return_tensors="pt", add_special_tokens=False).input_ids[0]
    n_calib = args.calib_windows
    calib = [kjv[i * 512:(i + 1) * 512][None] for i in range(n_calib)]
    train = kjv[n_calib * 512:]

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, tok, text, max_windows=args.windows, progress=False).ppl

    dense = ppl(model)
    print(f"dense ppl {dense:.2f} ({args.windows} windows of 512 ABC news tokens); {train.numel():,} KJV training "
          "tokens", flush=True)
    cap = kronc.capture(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    record: dict[str, Any] = {"dense_ppl": dense, "windows": args.windows, "minutes": args.minutes,
                              "seq_len": args.seq_len, "batch": args.batch, "lr": args.lr, "runs": [],
                              "planning": (f"`kronc.compile(model, budget, calibration=...)` with the default policy "
                                           f"(every format and precision), data-aware objective; calibration: the "
                                           f"first {n_calib} King James windows of 512 tokens (input moments from all, "
                                           "Fisher sensitivity from the first 2); training text: the King James text "
                                           "after them")}
    if "blockwise" in recoveries:
        first = min(max(round(args.block_share * args.segments), 1), args.segments - 1)
        record["blockwise"] = (
            f"the first {first} segment(s) reconstruct the blocks ({args.bw_samples} KJV windows of {args.seq_len}, "
            f"{args.bw_epochs} epochs, AdamW lr {args.bw_lr:g} per block, quantized tensors: "
            + ("latent weights through fake quantization (lr " + f"{latent_lr(args):g}" + " grid steps) + scales, re-encoded"
               if args.bw_quantized == "latent" else "scales only, codes frozen")
            + ", `blockwise.max_seconds` shared equally by "
            f"the layers and the tail), the rest distil end to end training quantization scales, norms and biases only (lr "
            f"{args.e2e_lr or args.lr:g}); their tokens are those each block saw in the block phase plus the "
            "end-to-end tokens.")
    moments: dict[str, torch.Tensor] | None = None
    runs = [(budget, method) for budget in args.budgets.split(",") for method in methods]
    for budget, method in runs:
        policy = Policy(budget=budget, objective="data")
        if moments is None and method != "kronc":
            res = resolve(policy, cap.sites, warn=False)
            sites = [s for s in cap.sites if res[s.name].in_scope]
            moments = collect_input_moments(model, sites, calib)
        t = time.perf_counter()
        if method == "kronc":  # what a user gets: the default policy, data-aware, Fisher sensitivity
            student, report = kronc.compile(model, budget, calibration=calib, report=True)
            plan = report.plan
        else:
            assert moments is not None
            plan, fit_moments = make_plan(cap, sites, policy, method, budget, moments)
            student = kronc.apply(cap, plan, moments=fit_moments)
        compile_s = time.perf_counter() - t
        kinds: dict[str, int] = {}
        for d in plan.decisions:
            label = d.values if d.spec.kind == "dense" else f"{d.spec.kind}:{d.values}"  # format and precision
            kinds[label] = kinds.get(label, 0) + 1
        free = ppl(student)
        print(f"{budget} {method}: plan {kinds}, {plan.bytes_before / plan.bytes_after:.2f}x, compiled in {compile_s:.0f} s; "
              f"training-free ppl {free:.2f}", flush=True)
        if args.minutes == 0:
            continue
        for recovery in recoveries:
            trained = copy.deepcopy(student) if len(recoveries) > 1 else student
            curve = [{"seconds": 0.0, "tokens": 0, "ppl": free}]
            train_curve(trained, model, train, args, recovery, ppl, curve, f"{budget} {method} {recovery}")
            record["runs"].append({"budget": budget, "method": method, "recovery": recovery,
                                   "ratio": plan.bytes_before / plan.bytes_after, "formats": kinds,
                                   "compile_seconds": compile_s, "curve": curve})
            del trained
            record["command"] = ("python benchmarks/recovery.py " + " ".join(sys.argv[1:])).strip()
            write(record, args.out)  # after every run: a cut-short benchmark keeps what it measured
    if record["runs"]:
        print(render(record))


def train_curve(student: torch.nn.Module, model: torch.nn.Module, train: torch.Tensor, args: argparse.Namespace,
                recovery: str, ppl: Any, curve: list[dict[str, Any]], label: str) -> None:
    """Train ``student`` for ``--minutes`` the ``recovery`` way, appending perplexity at each segment's end."""
    segment = args.minutes * 60 / args.segments
    distill = {"steps": 100_000, "schedule": "constant", "warmup": 0.0, "batch_size": args.batch, "seq_len": args.seq_len,
               "kd": 1.0, "hidden": 1.0, "lm": 0.0, "temperature": 2.0, "checkpoint_every": 1_000_000,
               "progress": False, "log_every": 20}
    first, done_s, done_tokens = 0, 0.0, 0
    if recovery == "blockwise":
        first = min(max(round(args.block_share * args.segments), 1), args.segments - 1)
        bw = kronc.recover(student, model, train, method="blockwise", batch_size=args.batch, seq_len=args.seq_len,
                           blockwise={"samples": args.bw_samples, "epochs": args.bw_epochs, "lr": args.bw_lr,
                                      "quantized": args.bw_quantized, "latent_lr": latent_lr(args),
                                      "max_seconds": first * segment}, progress=False)
        done_s = bw.block_seconds
        done_tokens = round(sum(b.tokens for b in bw.blocks) / max(len(bw.blocks), 1))
        cut = sum(b.timed_out for b in bw.blocks)
        curve.append({"seconds": done_s, "tokens": done_tokens, "steps": sum(b.steps for b in bw.blocks),
                      "block_tokens_per_second": sum(b.tokens for b in bw.blocks) / max(done_s, 1e-9), "ppl": ppl(student)})
        print(f"  {label} after the block phase, {done_s / 60:.1f} min ({len(bw.blocks)} blocks, {cut} cut short by "
              f"the time budget, {done_tokens:,} tokens per block): ppl {curve[-1]['ppl']:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(Path(tmp) / "recover.pt")
        for seg in range(first, args.segments):
            e2e = ({"trainable": "scales+norms+biases", "lr": args.e2e_lr or args.lr} if recovery == "blockwise"
                   else {"trainable": "factors+norms+biases", "lr": args.lr})
            result = kronc.recover(student, model, train, **distill, **e2e, max_seconds=segment, checkpoint_path=ckpt,
                                   resume=seg > first)
            last = result.history[-1]
            curve.append({"seconds": done_s + last.seconds, "tokens": done_tokens + last.tokens, "steps": last.step + 1,
                          "kd": last.parts.get("kd"), "ppl": ppl(student)})
            print(f"  {label} after {curve[-1]['seconds'] / 60:.1f} min ({last.step + 1} e2e steps, "
                  f"{curve[-1]['tokens']:,} tokens): ppl {curve[-1]['ppl']:.2f}", flush=True)


def latent_lr(args: argparse.Namespace) -> float:
    """``--bw-latent-lr``, or the library's default."""
    return args.bw_latent_lr or kronc.RecoveryConfig().blockwise.latent_lr


def make_plan(cap: kronc.Captured, sites: list, policy: Policy, method: str, budget: str,
              moments: dict[str, torch.Tensor]) -> tuple[Plan, dict[str, torch.Tensor] | None]:
    """The plan for ``method`` and the calibration moments its fits use (None: weight-only fits)."""
    if method == "kronc":
        return kronc.plan(cap, policy, moments=moments), moments
    if method == "kngpt2":  # one Kronecker product per linear, A of 2 or 4 values: each linear 2x or 4x smaller
        one_term = Policy.model_validate({"budget": budget, "objective": "weight", "default_formats": [
            {"kind": "kronecker", "a_shapes": [[2, 1], [1, 2], [2, 2], [4, 1], [1, 4]], "terms_max": 1,
             "min_factor": 1}]})
        return kronc.plan(cap, one_term), None
    weights = {s.name: cap.weight(s) for s in sites}
    fmt, data = {"kronecker": ("kronecker", False), "svd": ("lowrank", False), "asvd": ("lowrank", True)}[method]
    fit_moments = moments if data else None
    return uniform_plan(sites, weights, fmt, budget, moments=fit_moments), fit_moments


def write(record: dict[str, Any], name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2))
    (RESULTS / f"{name}.md").write_text(render(record, f"{name}.png"))
    plot(record, RESULTS / f"{name}.png")


def plot(record: dict[str, Any], path: Path) -> None:
    """Perplexity (log scale) against training minutes, one line per run, dense as a dashed line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in record["runs"]:
        curve = r["curve"]
        label = f"{r['budget']} {METHODS[r.get('method', 'kronc')]}, {r.get('recovery', 'distill')}"
        ax.plot([c["seconds"] / 60 for c in curve], [c["ppl"] for c in curve], marker="o", label=label)
    ax.axhline(record["dense_ppl"], color="k", linestyle="--", label=f"dense ({record['dense_ppl']:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("recovery training time, minutes (2-core CPU)")
    ax.set_ylabel(f"ABC news perplexity ({record['windows']}x512 tokens)")
    ax.set_title("SmolLM2-135M: perplexity against recovery time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(record: dict[str, Any], png: str | None = None) -> str:
    dense = record["dense_ppl"]
    runs = record["runs"]
    n = max(len(r["curve"]) for r in runs) - 1
    lines = [
        "# Recovery on SmolLM2-135M: perplexity against CPU training time", "",
        f"Command: `{record.get('command', 'python benchmarks/recovery.py')}`", "",
        f"Perplexity on the first {record['windows']} windows of 512 ABC news tokens (dense **{dense:.2f}**). "
        f"Training: King James text, {record['batch']}x{record['seq_len']} tokens per step, AdamW lr {record['lr']:g} "
        f"constant, logit KL (T=2) + hidden-state distillation of every decoder layer, factors, norms and biases "
        f"trained, {record['minutes']:g} min per run on this 2-core machine (shared with other jobs while "
        "measured; evaluation time not counted). Each cell: perplexity (minutes trained, tokens seen).", "",
        *([f"Plan (method `kronc plan`): {record['planning']}.", ""] if record.get("planning") else []),
        *([f"Block-wise runs: {record['blockwise']}", ""] if record.get("blockwise") else []),
        "| budget | method | recovery | ratio | formats | training-free | "
        + " | ".join(f"segment {i + 1}" for i in range(n)) + " | final / dense |",
        "|---|---|---|---|---|---|" + "---|" * n + "---|",
    ]
    for r in runs:
        formats = ", ".join(f"{k} {v}" for k, v in sorted(r["formats"].items()))
        cells = [f"{c['ppl']:.1f} ({c['seconds'] / 60:.1f} min, {c['tokens'] / 1000:.0f}k)" for c in r["curve"][1:]]
        cells += [""] * (n - len(cells))
        lines.append(f"| {r['budget']} | {METHODS[r.get('method', 'kronc')]} | {RECOVERY[r.get('recovery', 'distill')]} | "
                     f"{r['ratio']:.2f}x | {formats} | "
                     f"{r['curve'][0]['ppl']:.1f} | {' | '.join(cells)} | {r['curve'][-1]['ppl'] / dense:.2f}x |")
    if png:
        lines += ["", f"![perplexity against recovery time]({png})"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
