"""Why does kronc's 10x plan of SmolLM2 lose to uniform rotated int3? The planner's estimated damage
per site and precision against the real fit's output error on held-out data, and against perplexity.

    python benchmarks/int2_diagnosis.py --threads 1 [--budget 10] [--cache /tmp/int2_diag.pt]

1. Plans SmolLM2-135M at ``--budget`` as ``benchmarks/quality.py`` does (default policy, 8 King James
   calibration windows, Fisher sensitivity from the first 2).
2. For every site and a few precisions (int2/int3/int4, rotated GPTQ or data-free), compares the
   planner's estimated relative output error with the error of the real fit (`fit_site`, all 8
   calibration windows) measured with the calibration Gram matrix (in sample), with the Gram matrix of 8
   further King James windows (held out, same text) and with the ABC news evaluation windows' Gram.
3. Perplexity on ABC news (and held-out King James) of the plan and of swaps: the plan's int2 sites
   raised to rotated int3, uniform rotated int3, and uniform rotated int3 with the plan's int2 sites at
   int2; next to the planner's predicted loss change ``½ Σ damage`` (the Fisher model of `make_plan`).

Writes ``benchmarks/results/int2_diagnosis.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from quality import Bench, _smollm2, calib_error  # noqa: E402

from kronc.formats import DenseSpec  # noqa: E402
from kronc.planning import collect_input_moments, fit_site, make_plan  # noqa: E402
from kronc.tools.data import abc_news_text, kjv_text  # noqa: E402
from kronc.values import Precision  # noqa: E402

RESULTS = Path(__file__).parent / "results"
INT3ROT = Precision(dtype="int3", group_size=64, symmetric=False, fit="gptq", rotate=True)
PRECISIONS = (
    Precision(dtype="int2", group_size=64, symmetric=False, fit="hqq"),
    Precision(dtype="int2", group_size=32, symmetric=False, fit="hqq"),
    Precision(dtype="int3", group_size=64, symmetric=False, fit="hqq"),
    INT3ROT,
    Precision(dtype="int3", group_size=128, symmetric=False, fit="gptq", rotate=True),
    Precision(dtype="int4", group_size=64, symmetric=False, fit="hqq"),
)


def windows(ids: torch.Tensor, first: int, count: int, size: int = 512) -> list[torch.Tensor]:
    return [ids[i * size:(i + 1) * size][None] for i in range(first, first + count)]


def estimate_of(bench: Bench, site: str, p: Precision) -> tuple[float, float] | None:
    """The planner's (relative error, damage) of ``site`` stored dense at ``p`` (None: not a candidate)."""
    for c in bench.cache[site]:
        if c.spec.kind == "dense" and c.spec.precision == p:
            return float(c.error), float(c.damage)
    return None


def total(w: torch.Tensor, h: torch.Tensor) -> float:
    return float(((w.double() @ h.double()) * w.double()).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=float, default=10.0)
    ap.add_argument("--windows", type=int, default=8, help="ABC / held-out King James windows of 512 tokens")
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--cache", type=Path, default=None, help="keep the planner's tables here (pickle) across runs")
    ap.add_argument("--out", type=Path, default=RESULTS / "int2_diagnosis")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the existing .json")
    args = ap.parse_args()
    if args.render:
        args.out.with_suffix(".md").write_text(render(json.loads(args.out.with_suffix(".json").read_text())))
        return
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    kjv = kjv_text(max_chars=400_000)
    bench, dense, info, _ = _smollm2(args, kjv, heldout=True)
    from kronc.tools.zoo import load_smollm2  # the tokenizer (the bench keeps only the model)

    _, tok = load_smollm2()
    kjv_ids = tok(kjv, return_tensors="pt", add_special_tokens=False).input_ids[0]
    abc_ids = tok(abc_news_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    held_h = collect_input_moments(bench.model, bench.sites, windows(kjv_ids, args.calib_windows, args.windows), progress=False)
    abc_h = collect_input_moments(bench.model, bench.sites, windows(abc_ids, 0, args.windows), progress=False)
    if args.cache is not None and args.cache.exists():
        bench.cache.update(torch.load(args.cache, weights_only=False))
    t = time.perf_counter()
    plan = make_plan(bench.sites, bench.weights, bench.space, f"{args.budget:g}x", moments=bench.moments,
                     importance=bench.importance, cache=bench.cache, progress=False)
    plan_s = time.perf_counter() - t
    if args.cache is not None and not args.cache.exists():
        torch.save(bench.cache, args.cache)
    picks = {d.site: d for d in plan.decisions}
    int2_sites = [d.site for d in plan.decisions if d.spec.precision is not None and d.spec.precision.dtype == "int2"]
    print(f"plan {args.budget:g}x in {plan_s:.0f}s: {len(int2_sites)} int2 sites", flush=True)

    # ---- per site and precision: estimate vs the real fit's error (in sample, held out, ABC)
    fitted: dict[tuple[str, str], torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    for site in bench.sites:
        w = bench.weights[site.name].detach().float()
        h_cal, h_held, h_abc = bench.moments[site.name], held_h[site.name], abc_h[site.name]
        kappa = float(bench.importance.get(site.name, 0.0))
        for p in PRECISIONS:
            est = estimate_of(bench, site.name, p)
            if est is None:
                continue
            dense_w = fit_site(w, DenseSpec(precision=p), h_cal).to_dense().detach().float()
            fitted[(site.name, p.describe())] = dense_w
            errs = {k: calib_error(w, dense_w, h) for k, h in (("calib", h_cal), ("held", h_held), ("abc", h_abc))}
            rows.append({
                "site": site.name, "precision": p.describe(), "est": est[0], "est_damage": est[1], "kappa": kappa,
                "total_calib": total(w, h_cal), "total_held": total(w, h_held), "total_abc": total(w, h_abc),
                **errs, "picked": picks[site.name].values == p.describe(),
            })
    fit_s = time.perf_counter() - t - plan_s
    print(f"fits {fit_s:.0f}s", flush=True)

    plan_fit = {d.site: (fitted.get((d.site, d.values)) if d.spec.kind == "dense" else None) for d in plan.decisions}
    for d in plan.decisions:  # the plan's own picks outside PRECISIONS
        if plan_fit[d.site] is None:
            w = bench.weights[d.site].detach().float()
            plan_fit[d.site] = w if d.spec.identity else fit_site(w, d.spec, bench.moments[d.site]).to_dense().detach().float()
    by_damage = {(r["site"], r["precision"]): r["est_damage"] for r in rows}
    plan_damage = {d.site: next(float(c.damage) for c in bench.cache[d.site] if c.spec == d.spec) for d in plan.decisions}
    plan_bytes = {d.site: d.bytes_after for d in plan.decisions}

    def site_bytes(site: str, name: str) -> int:
        return next(c.nbytes for c in bench.cache[site] if c.spec.kind == "dense" and c.spec.precision is not None
                    and c.spec.precision.describe() == name)

    def score(change: dict[str, str]) -> dict[str, Any]:
        model = copy.deepcopy(bench.model)
        with torch.no_grad():
            for site in bench.sites:
                new = fitted[(site.name, change[site.name])] if site.name in change else plan_fit[site.name]
                getattr(model.get_submodule(site.owner), site.attr).copy_(new)
        nbytes = sum(site_bytes(s, change[s]) if s in change else plan_bytes[s] for s in plan_bytes)
        pred = 0.5 * sum(by_damage[(s, change[s])] if s in change else plan_damage[s] for s in plan_bytes)
        return {"ratio": dense_bytes / nbytes, **bench.score(model), "pred_dloss": pred}

    int3 = INT3ROT.describe()
    plan_choice = {d.site: d.values for d in plan.decisions}
    variants = {
        "plan": {},
        "plan, int2 sites -> int3g64a-gptq-rot": {s: int3 for s in int2_sites},
        "uniform int3g64a-gptq-rot": {s.name: int3 for s in bench.sites},
        "uniform int3g64a-gptq-rot, plan's int2 sites at int2": {
            s.name: (plan_choice[s.name] if s.name in int2_sites else int3) for s in bench.sites},
    }
    dense_bytes = sum(s.nbytes for s in bench.sites)
    ppl_rows = []
    for name, change in variants.items():
        row = {"variant": name, **score(change)}
        ppl_rows.append(row)
        print(row, flush=True)
    report = {"command": "python benchmarks/int2_diagnosis.py " + " ".join(sys.argv[1:]), "load": os.getloadavg(),
              "budget": args.budget, "dense": dense, "info": info, "plan_s": plan_s, "fit_s": fit_s,
              "int2_sites": int2_sites, "sites": rows, "variants": ppl_rows, "total_s": time.perf_counter() - t0}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(render(report))
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


def summary(report: dict[str, Any]) -> list[str]:
    """Per precision: Σ estimated damage against Σ κ err² total measured in sample / held out / ABC."""
    out = ["| precision | sites | est err (mean) | real err calib / KJV held / ABC (mean) | est÷real damage: calib / held / ABC |",
           "|---|---|---|---|---|"]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in report["sites"]:
        by.setdefault(r["precision"], []).append(r)
    for p, rs in by.items():
        n = len(rs)
        mean = {k: sum(r[k] for r in rs) / n for k in ("est", "calib", "held", "abc")}
        est = sum(r["est_damage"] for r in rs)
        real = {k: sum(r["kappa"] * r[k] ** 2 * r[f"total_{'calib' if k == 'calib' else k}"] for r in rs)
                for k in ("calib", "held", "abc")}
        ratios = " / ".join(f"{est / real[k]:.2f}" if real[k] else "-" for k in ("calib", "held", "abc"))
        out.append(f"| `{p}` | {n} | {mean['est']:.4f} | {mean['calib']:.4f} / {mean['held']:.4f} / {mean['abc']:.4f} | {ratios} |")
    return out



def render(report: dict[str, Any]) -> str:
    """The Markdown report: per-precision estimate against the real fit, the perplexity variants, a reading."""
    dense = report["dense"]
    lines = [
        f"# Why kronc's {report['budget']:g}x plan of SmolLM2 lost to uniform rotated int3: estimate vs real fit vs perplexity",
        "",
        f"- command: `{report.get('command', 'python benchmarks/int2_diagnosis.py --threads 1')}` (1 thread; shared 2-core "
        f"machine, load average {' '.join(f'{x:.1f}' for x in report.get('load', []))}); "
        f"{report['total_s'] / 60:.0f} min",
        "- calibration: 8 King James windows of 512 tokens (as `quality.py`); held out: King James windows 8-15; "
        "ABC: the 8 ABC news evaluation windows",
        f"- dense: ABC perplexity {dense['ppl']:.2f}, held-out King James {dense['kjv_ppl']:.2f}",
        f"- the plan puts {len(report['int2_sites'])} sites at int2",
        "",
        "## Per precision: the planner's estimate against the real fit (all 210 sites)",
        "",
        "Relative output error ||(W - Ŵ) S|| / ||W S||; the real fit is `fit_site` on all 8 calibration windows, "
        "measured with the Gram matrix of the calibration windows (in sample), of 8 further King James windows "
        "(held out) and of the ABC evaluation windows. Damage ratio: Σ estimated damage / Σ κ err² ||W S||² "
        "(κ the Fisher sensitivity), > 1 = the estimate is pessimistic.",
        "",
        *summary(report),
        "",
        "## Perplexity: the plan, and the plan's int2 sites swapped",
        "",
        "pred: the planner's own loss model, ½ Σ damage (nats per token); real: ln(ppl / dense ppl) on ABC.",
        "",
        "| variant | ratio | ABC ppl | held-out KJV ppl | pred | real | real / pred |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in report["variants"]:
        real = math.log(v["ppl"] / dense["ppl"])
        lines.append(f"| {v['variant']} | {v['ratio']:.2f}x | {v['ppl']:.1f} | {v['kjv_ppl']:.2f} | {v['pred_dloss']:.3f} | "
                     f"{real:.3f} | {real / v['pred_dloss']:.2f} |")
    by = {v["variant"]: v for v in report["variants"]}
    plan, no2 = by.get("plan"), by.get("plan, int2 sites -> int3g64a-gptq-rot")
    if plan and no2:
        real = math.log(plan["ppl"] / no2["ppl"])
        pred = plan["pred_dloss"] - no2["pred_dloss"]
        base = math.log(no2["ppl"] / dense["ppl"]) / no2["pred_dloss"]
        lines += [
            "",
            f"The int2 sites' increment (plan against the same plan with them at rotated int3): real {real:.3f}, "
            f"predicted {pred:.3f}, real/pred {real / pred:.2f}, against {base:.2f} for everything else in the plan.",
        ]
    lines += ["", "## Reading", "", READING, "", "## After the fix", "", AFTER, ""]
    return "\n".join(lines)


READING = """\
- **The estimate is right about int2.** The data-free int2 fits' estimated errors match the real fit within
  a few percent on the calibration text, on held-out King James and on ABC news (the data-free fit does not
  depend on the text). In perplexity, the plan's int2 sites cost what the planner's loss model says relative
  to everything else (real/pred of their increment about the same as the rest of the plan's): not
  underrated, and the damage adds up across sites (uniform int3 with the plan's int2 sites lands where the
  sum predicts). The planner itself rated the 10x plan about twice as damaging as 9.14x uniform int3.
- **The candidate set was the problem.** 10x is 3.2 bits per weight. Rotated int3 costs 3.5 bits with
  groups of 64 and 3.25 with groups of 128, and groups of 128 divide only the 1536-wide inputs (down_proj,
  a quarter of the weights); the 576-wide inputs have nothing between 3.5 bits and int2 (3.0 bits g32,
  2.5 bits g64). So the last 9% of bytes had to come from int2, at 3-4x the relative error of rotated int3.
  The fix adds rotated int3 with one scale per row (3.02-3.08 bits; the rotation evens out each row, so a
  row-wide range costs 20-40% more error than groups of 64, against 3x for int2).
- **Something the estimate does get wrong, but not here:** the rotated GPTQ fits' estimate is held out
  across two halves of the King James calibration, and on that text it is accurate (held-out damage ratio
  about 1.1); on ABC news the real error of the same fit is higher (ratio about 0.55). GPTQ still fits the
  calibration text's statistics; a different calibration text would be the remedy, not the estimator.
- Per-site estimates are ±10% of the real fit on held-out King James for every precision measured."""


AFTER = """\
Measured with `benchmarks/quality.py` (rows `-rot3` of `benchmarks/results/quality_quant.md`; commands there),
rotated int3 with one scale per row among the default precisions:

- SmolLM2 10x: 124.3 -> **94.1** ABC perplexity (2.85x dense): 119 sites take the per-row grid, 11 int8, one int2.
  Better than every uniform configuration near 10x (uniform `int3a-gptq-rot`, 10.50x: 131.1), not yet as good
  as uniform rotated int3 with groups of 64 at 9.14x (9% more bytes): 66.93, `int3g64a-gptq-rot`.
- SmolLM2 at 9.14x (the bytes of uniform rotated int3 g64): **64.9** (`kronc@9.14x-rot3`), better than that
  uniform configuration at the same bytes (66.93, `int3g64a-gptq-rot`).
- SmolLM2 8x: 50.6 -> 50.35 (not worse). 16x: 2.1e5, 25x: 3.0e5 (at 2 bits per weight and below only int2
  and pruning are left; targets missed by orders of magnitude).
- MiniLM: 8x Pearson 0.632 (0.631 before), 10x 0.673 (0.666 before).
- What is left at 10x: the rotated GPTQ estimates are accurate on held-out King James but about 1.4x too low
  in relative error (2x in damage) on ABC news, for every kind of site (q/k/v/o/gate/up/down, medians 1.32-1.51)
  while the data-free fits' are exact there; so the planner still buys int8 on 11 sites with per-row int3
  elsewhere, a trade that pays on the calibration text more than on the evaluation text."""


if __name__ == "__main__":
    main()
