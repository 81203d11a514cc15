"""Planner speed on SmolLM2-135M-shaped sites (210 random weights): seconds per stage.

Stages: candidate enumeration, error estimation (the decompositions), solve. The analysis is done
once and solved at each budget, as `kronc.planning.make_plan` would (it re-analyses per call; the
split here shows where the time goes), followed by one full `make_plan` call end to end.

    python benchmarks/search_speed.py                 # weight metric, default policy choices
    python benchmarks/search_speed.py --data          # data-aware metric (random anisotropic moments)
    python benchmarks/search_speed.py --workers 1     # one site at a time

The analysis runs torch single-threaded, ``--workers`` sites at once (default: one per core). Wall
times on a machine shared with other jobs vary a lot; the process CPU time of the analysis is
printed too (its sum over workers: divided by the workers it is the wall time on idle cores).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kronc.budget import Budget
from kronc.planning import SearchOptions, make_plan, site_candidates, solve
from kronc.planning.candidates import Candidate
from kronc.planning.estimate import SiteAnalysis
from kronc.planning.planner import map_sites
from kronc.policies.choices import ALL_FORMATS
from kronc.sites import Site

HIDDEN, KV, FFN, LAYERS = 576, 192, 1536, 30
PROJ = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
        "gate_proj": (FFN, HIDDEN), "up_proj": (FFN, HIDDEN), "down_proj": (HIDDEN, FFN)}


def smollm2_sites(dtype: torch.dtype = torch.bfloat16) -> list[Site]:
    sites = []
    for layer in range(LAYERS):
        for proj, shape in PROJ.items():
            part = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            owner = f"model.layers.{layer}.{part}.{proj}"
            sites.append(Site(name=f"{owner}.weight", kind="linear", shape=shape, dtype=dtype, owner=owner, attr="weight"))
    return sites


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", nargs="+", default=["4x", "25x"])
    ap.add_argument("--data", action="store_true", help="data-aware metric with random input moments")
    ap.add_argument("--workers", type=int, default=0, help="sites analysed at once (SearchOptions.workers; 0: per core)")
    ap.add_argument("--json", default=None, help="also write the timings to this JSON file")
    args = ap.parse_args()
    torch.manual_seed(0)
    sites = smollm2_sites()
    weights = {s.name: (torch.randn(s.shape) / s.shape[1] ** 0.5).to(s.dtype) for s in sites}
    moments = None
    if args.data:
        moments = {}
        for dim in (HIDDEN, FFN):
            x = torch.randn(4 * dim, dim, dtype=torch.float64) * torch.logspace(-1, 1, dim, dtype=torch.float64)
            h = x.T @ x / x.shape[0]
            for s in sites:
                if s.shape[1] == dim:
                    moments[s.name] = h
    options = SearchOptions(workers=args.workers)
    spaces = {s.name: list(ALL_FORMATS) for s in sites}

    t0 = time.perf_counter()
    raw = [site_candidates(s.shape, s.dtype, spaces[s.name], options) for s in sites]
    t_cand = time.perf_counter() - t0
    cands_of = dict(zip([s.name for s in sites], raw, strict=True))

    def analyse(s: Site) -> list[Candidate]:
        an = SiteAnalysis(weights[s.name], None if moments is None else moments[s.name], options.damping)
        errs = an.errors([c.spec for c in cands_of[s.name]])
        return [Candidate(c.spec, c.nbytes, c.nparams, c.choice, float(e), float(e) ** 2 * an.total)
                for c, e in zip(cands_of[s.name], errs, strict=True)]

    t0, c0 = time.perf_counter(), time.process_time()
    tables = map_sites(analyse, sites, options.worker_count(), "analysing", progress=False)
    t_est, c_est = time.perf_counter() - t0, time.process_time() - c0
    dense = sum(s.nbytes for s in sites)
    params = sum(s.numel for s in sites)
    report: dict[str, object] = {
        "sites": len(sites), "candidates": sum(len(t) for t in tables),
        "workers": options.worker_count(), "metric": "data" if args.data else "weight", "enumerate_s": round(t_cand, 3),
        "estimate_s": round(t_est, 3), "estimate_cpu_s": round(c_est, 3),
    }
    print(f"{len(sites)} sites, {report['candidates']} candidates, "
          f"{options.worker_count()} workers, {report['metric']} metric")
    print(f"  enumerate candidates: {t_cand:7.2f} s")
    print(f"  estimate errors:      {t_est:7.2f} s   (process CPU time {c_est:.2f} s)")
    for b in args.budgets:
        key, limit = Budget.parse(b).limit(dense, params)
        t0 = time.perf_counter()
        picks = solve(tables, limit, key, grid=options.dp_grid)
        t_solve = time.perf_counter() - t0
        after = sum(t[i].nbytes for t, i in zip(tables, picks, strict=True))
        kinds: dict[str, int] = {}
        for t, i in zip(tables, picks, strict=True):
            kinds[t[i].spec.kind] = kinds.get(t[i].spec.kind, 0) + 1
        rel = (sum(t[i].damage for t, i in zip(tables, picks, strict=True)) / sum(
            float(weights[s.name].float().square().sum()) for s in sites)) ** 0.5 if not args.data else float("nan")
        print(f"  solve {b:>4}:           {t_solve:7.2f} s   -> {dense / after:5.2f}x, formats {kinds}"
              + (f", overall rel. error {rel:.3f}" if not args.data else ""))
        report[f"solve_{b}_s"] = round(t_solve, 3)
    for b in args.budgets:
        t0 = time.perf_counter()
        plan = make_plan(sites, weights, spaces, b, moments=moments, progress=False, options=options)
        t_all = time.perf_counter() - t0
        print(f"  make_plan {b:>4} end to end: {t_all:7.2f} s   -> {plan.ratio:5.2f}x")
        report[f"make_plan_{b}_s"] = round(t_all, 3)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
