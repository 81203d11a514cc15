"""Does the planner's damage order uniform quantizations the way perplexity does?

For every rtn / hqq uniform configuration measured in ``benchmarks/results/quality_quant.json``
(SmolLM2-135M, ABC news perplexity), sum what the planner would charge for putting every site at that
precision: the estimated relative error (`SiteAnalysis.dense_quant_error`, data-aware with the
calibration Gram), squared, times the site's output energy and its Fisher sensitivity, as in
`kronc.planning.make_plan`. Prints both orders and their Spearman rank correlation, also without the
sensitivity (plain output error) for comparison; writes ``benchmarks/results/estimate_order.md``.

    python benchmarks/estimate_order.py --threads 1   # calibrates as quality.py does (8 KJV windows)

GPTQ and joint configurations are left out: the planner estimates a gptq precision by its data-free
fit, and the joint fit is not a dense precision.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from quality import QuantConfig  # noqa: E402  (benchmarks/quality.py: the table's config names)

import kronc  # noqa: E402
from kronc.planning import collect_input_moments, collect_sensitivity  # noqa: E402
from kronc.planning.estimate import SiteAnalysis  # noqa: E402
from kronc.policies import Policy, resolve  # noqa: E402
from kronc.tools.data import kjv_text  # noqa: E402
from kronc.tools.zoo import load_smollm2  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--cache", type=Path, default=None, help="save/load the calibration statistics here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table = json.loads((RESULTS / "quality_quant.json").read_text())["models"]["smollm2"]
    rows = [r for r in table["rows"] if "ppl" in r and r["family"] in ("rtn", "hqq", "cast")
            and not (r["bits"] == 4 and r["group"] == 32 and r["symmetric"] is False)]  # the source grid apart
    model, tok = load_smollm2()
    captured = kronc.capture(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    res = resolve(Policy(budget="2x", objective="data"), captured.sites, warn=False)
    sites = [s for s in captured.sites if res[s.name].in_scope]
    if args.cache is not None and args.cache.exists():
        saved = torch.load(args.cache)
        moments, importance = saved["m"], saved["i"]
    else:
        ids = tok(kjv_text(max_chars=400_000), return_tensors="pt", add_special_tokens=False).input_ids[0]
        calib = [ids[i * 512:(i + 1) * 512][None] for i in range(args.calib_windows)]
        moments = dict(collect_input_moments(model, sites, calib, progress=False))
        importance = collect_sensitivity(model, sites, calib, max_batches=2, progress=False)
        if args.cache is not None:
            torch.save({"m": moments, "f": {}, "i": importance}, args.cache)
    t = time.perf_counter()
    damage = {r["config"]: [0.0, 0.0] for r in rows}
    for site in sites:
        an = SiteAnalysis(captured.weight(site), moments[site.name])
        for r in rows:
            p = QuantConfig.parse(r["config"]).precision
            e2 = an.dense_quant_error(p) ** 2 * an.total
            damage[r["config"]][0] += e2 * float(importance[site.name])
            damage[r["config"]][1] += e2
    seconds = time.perf_counter() - t
    ppl = [r["ppl"] for r in rows]
    rho = spearman([damage[r["config"]][0] for r in rows], ppl)
    rho_plain = spearman([damage[r["config"]][1] for r in rows], ppl)
    lines = ["# Does the planner's estimate order quantizations as perplexity does? (SmolLM2-135M)", "",
             "- command: `python benchmarks/estimate_order.py --threads 1`; perplexities from `quality_quant.json` "
             "(ABC news, 8 windows of 512), estimates with the King James calibration (8 windows of 512)",
             f"- {len(rows)} uniform rtn/hqq/cast configurations (source grid excluded); estimates for all sites "
             f"in {seconds:.1f} s",
             f"- Spearman rank correlation with perplexity: **{rho:.3f}** (planner's damage, Fisher-weighted), "
             f"{rho_plain:.3f} (plain output error, no sensitivity)", "",
             "| config | ratio | perplexity | planner damage (Fisher) | output error only |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["ppl"]):
        d = damage[r["config"]]
        lines.append(f"| `{r['config']}` | {r['ratio']:.2f}x | {r['ppl']:.4g} | {d[0]:.4g} | {d[1]:.4g} |")
    (RESULTS / "estimate_order.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
