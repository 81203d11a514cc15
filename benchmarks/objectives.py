"""Which damage objective predicts perplexity? SmolLM2-135M, training-free, one budget.

    python benchmarks/objectives.py 2x --windows 2 --variants abs,rel,rel_bytes,asvd,wanda

Plans the decoder linears with kronc's solver under three weightings of the per-site data-aware
output error (``abs``: absolute squared error, the default; ``rel``: relative squared error;
``rel_bytes``: relative error times the site's bytes) and compares them with two uniform
baselines (``asvd``: activation-aware SVD; ``wanda``: unstructured pruning ranked by
``|W| * sqrt(diag E[x xᵀ])``, index bytes counted). Calibration: 4 windows of 512 King James tokens
(cached per user, under ``$KRONC_CACHE`` or ``~/.cache/kronc``); evaluation: the first ``--windows`` windows of 512 ABC news tokens.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

import kronc
from kronc.planning import collect_input_moments, make_plan, uniform_plan
from kronc.planning.calibrate import InputMoments
from kronc.planning.whiten import damped
from kronc.policies import Policy, resolve
from kronc.tools.data import abc_news_text, kjv_text
from kronc.tools.evaluate import perplexity
from kronc.tools.zoo import default_cache_root, load_smollm2


def moments_cache() -> Path:
    """The calibration moments' cache: per user (never a fixed path in the shared temporary directory)."""
    return default_cache_root() / "benchmarks" / "smollm2_moments_kjv4.pt"


def cached_moments(path: Path, collect: Callable[[], InputMoments]) -> InputMoments:
    """The moments in ``path`` (read with ``weights_only=True``: tensors only), else ``collect()`` saved there."""
    if path.is_file():
        data = torch.load(path, map_location="cpu", weights_only=True)
        moments = InputMoments(data["moments"])
        moments.folds = dict(data["folds"])
        return moments
    moments = collect()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({"moments": dict(moments), "folds": dict(moments.folds)}, tmp)  # plain dicts: weights_only loads them
    os.replace(tmp, path)
    return moments


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("budget", nargs="?", default="2x")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--variants", default="abs,rel,rel_bytes,asvd,wanda")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_smollm2()
    cap = kronc.capture(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    res = resolve(Policy(budget=args.budget, objective="data"), cap.sites, warn=False)
    sites = [s for s in cap.sites if res[s.name].in_scope]
    weights = {s.name: cap.weight(s) for s in sites}

    def collect() -> InputMoments:
        ids = tok(kjv_text(max_chars=20000), return_tensors="pt", add_special_tokens=False).input_ids[0]
        return collect_input_moments(model, sites, [ids[i * 512:(i + 1) * 512][None] for i in range(4)])

    moments = cached_moments(moments_cache(), collect)
    text = abc_news_text()

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, tok, text, max_windows=args.windows, progress=False).ppl

    print(f"dense ppl {ppl(model):.2f} ({args.windows} windows of 512 ABC news tokens)", flush=True)
    totals = {s.name: float(((weights[s.name].double() @ damped(moments[s.name])) * weights[s.name].double()).sum())
              for s in sites}
    importance = {
        "abs": None,
        "rel": {n: 1.0 / t for n, t in totals.items()},
        "rel_bytes": {s.name: s.nbytes / totals[s.name] for s in sites},
    }
    spaces = {s.name: list(res[s.name].formats) for s in sites}
    ratio = kronc.Budget.parse(args.budget).value
    for name in args.variants.split(","):
        t = time.perf_counter()
        if name == "asvd":
            plan = uniform_plan(sites, weights, "lowrank", ratio, moments=moments)
        elif name == "wanda":
            plan = uniform_plan(sites, weights, "doped", ratio, moments=moments)
        else:
            plan = make_plan(sites, weights, spaces, args.budget, moments=moments, importance=importance[name], progress=False)
        kinds: dict[str, int] = {}
        for d in plan.decisions:
            kinds[d.spec.kind] = kinds.get(d.spec.kind, 0) + 1
        errs = sorted(d.error or 0.0 for d in plan.decisions)
        small = kronc.apply(cap, plan, moments=moments)
        print(f"{args.budget} {name:9s} ppl {ppl(small):12.2f}  {kinds}  site error median {errs[len(errs) // 2]:.3f} "
              f"max {errs[-1]:.3f}  [{time.perf_counter() - t:.0f}s]", flush=True)


if __name__ == "__main__":
    main()
