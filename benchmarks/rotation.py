"""Incoherence processing: uniform quantization of ``W R`` against ``W``, training-free.

    python benchmarks/rotation.py --threads 1

``R`` is `kronc.values.rotation`'s randomized blockwise Hadamard along the input dimension (fixed
seed; block 64 for SmolLM2's width 576, 512 for its MLP width 1536, 128 for MiniLM's 384). Each
config is fitted on ``W`` and on ``W R`` (GPTQ on the rotated Gram matrix ``Rᵀ H R``); the rotated
fit is evaluated as the dense weight ``Q(W R) Rᵀ``, which is exactly what ``y = (x R) Q(W R)ᵀ`` computes.
Same models, texts, windows, scores and calibration output error as ``quality.py --quant`` (its
loaders and `Bench` are reused). Writes ``benchmarks/results/rotation.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from quality import Bench, QuantConfig, _minilm, _smollm2, calib_error, say
from torch import nn

from kronc.tools.data import kjv_text
from kronc.values import decode, encode, encode_levels, fit_gptq
from kronc.values import rotation as rot

RESULTS = Path(__file__).parent / "results"
CONFIGS = "int4g64a-hqq,int3g64a-hqq,int3g64a-gptq@0.1,int2g64a-hqq"


VARIANTS = {"none": None, "block": False, "full": True}
"""No rotation; blockwise (largest power-of-two block); full (Kronecker with Paley's order-12 Hadamard)."""


def quantize(bench: Bench, q: QuantConfig, variant: str) -> tuple[nn.Module, int, float]:
    """A copy of the model with every site's weight replaced by its fit at ``q`` (of ``W R`` for a
    rotation ``variant``, un-rotated back), the stored bytes, and the mean relative calibration output error."""
    import copy

    out = copy.deepcopy(bench.model)
    stored, errs = 0, []
    with torch.no_grad():
        for site in bench.sites:
            w = bench.weights[site.name].detach().float()
            h = bench.moments.get(site.name)
            full = VARIANTS[variant]
            rotate = full is not None
            wf, hf = w, h
            if full is not None:
                wf = rot.rotate(w, full=full)
                hf = None if h is None else rot.rotate_gram(h.double(), full=full).float()
            if q.damp is not None:
                e = encode_levels(fit_gptq(wf, q.precision, hf, damp=q.damp), q.precision, tuple(w.shape))
            else:
                e = encode(wf, q.precision, hf)
            dense = decode(e)
            if rotate:
                dense = rot.unrotate(dense, full=bool(full))
            stored += e.nbytes()
            if h is not None:
                errs.append(calib_error(w, dense, h))
            param = getattr(out.get_submodule(site.owner), site.attr)
            param.copy_(dense.T if site.kind == "conv1d" else dense)
    return out, stored, sum(errs) / max(1, len(errs))


def write(report: dict[str, Any], out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = ["# Incoherence processing (randomized Hadamard) against plain quantization, training-free", "",
             f"- command: `{report['command']}` ({report['threads']} thread(s), torch {report['torch']}; "
             f"load average at start {report['load']}; shared 2-core machine)",
             "- `block`: the fit quantizes `W R`, R = diag(±1 signs from a fixed seed) · blockdiag(H_b/sqrt(b)), b = the "
             "largest power of two dividing the input dimension (64 for 576, 512 for 1536, 128 for 384); `full`: one "
             "Hadamard block over the whole input, the Kronecker product of Paley's order-12 matrix and Sylvester's "
             "(576 = 12·12·4, 1536 = 12·128, 384 = 12·32); GPTQ uses `Rᵀ H R`; stored bytes are identical (fixed seed)",
             "- calib err: mean over sites of ||(W - Ŵ) S|| / ||W S|| (S Sᵀ = the calibration Gram matrix), as in quality_quant.md",
             ""]
    for key, info in report["models"].items():
        lm = key == "smollm2"
        d = info["dense"]
        lines += [f"## {info['model']}", "", f"- evaluation: {info['evaluation']}", f"- calibration: {info['calibration']}",
                  f"- dense: {', '.join(f'{k} {v:.4g}' for k, v in d.items())}", ""]
        if lm:
            lines += ["| config | rotation | ratio | ABC ppl (x dense) | KJV held-out ppl (x dense) | calib err |",
                      "|---|---|---|---|---|---|"]
        else:
            lines += ["| config | rotation | ratio | Pearson (Δ dense) | probe acc | calib err |", "|---|---|---|---|---|---|"]
        rows = sorted(info["rows"], key=lambda r: (r["ratio"], r["config"], list(VARIANTS).index(r["rotation"])))
        for r in rows:
            if lm:
                cells = [f"{r['ppl']:.4g} ({r['ppl'] / d['ppl']:.3f}x)", f"{r['kjv_ppl']:.4g} ({r['kjv_ppl'] / d['kjv_ppl']:.3f}x)"]
            else:
                cells = [f"{r['pearson']:.3f} ({r['pearson'] - d['pearson']:+.3f})", f"{r['probe']:.3f}"]
            lines.append(f"| `{r['config']}` | {r['rotation']} | {r['ratio']:.2f}x | " + " | ".join(cells)
                         + f" | {r['calib_output_err']:.4f} |")
        lines.append("")
    if report.get("notes"):
        lines += [report["notes"], ""]
    out.with_suffix(".md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--models", default="smollm2,minilm")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--variants", default="none,block,full", help=f"rotations to compare, of {list(VARIANTS)}")
    ap.add_argument("--append", action="store_true", help="add (or replace) rows in the existing results")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "rotation")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import os

    report: dict[str, Any] = {"command": "python benchmarks/rotation.py " + " ".join(sys.argv[1:]), "threads": args.threads,
                              "torch": torch.__version__, "load": " ".join(f"{v:.2f}" for v in os.getloadavg()), "models": {}}
    configs = [QuantConfig.parse(c) for c in args.configs.split(",")]
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown rotation {v!r}; allowed: {list(VARIANTS)}")
    if args.append and args.out.with_suffix(".json").exists():
        previous = json.loads(args.out.with_suffix(".json").read_text())
        report["models"] = previous["models"]
        report["command"] = previous["command"] + "; then " + report["command"]
    kjv = kjv_text(max_chars=400_000)
    for key in args.models.split(","):
        bench, dense, info, _ = _smollm2(args, kjv, heldout=True) if key == "smollm2" else _minilm(args, kjv)
        dense_bytes = sum(s.nbytes for s in bench.sites)
        done = {(c.name, v) for c in configs for v in variants}
        info["rows"] = [r for r in report["models"].get(key, {}).get("rows", []) if (r["config"], r["rotation"]) not in done]
        report["models"][key] = info
        for q in configs:
            for variant in variants:
                t = time.perf_counter()
                small, stored, err = quantize(bench, q, variant)
                fit_s = time.perf_counter() - t
                scores = bench.score(small)
                row = {"config": q.name, "rotation": variant, "ratio": dense_bytes / stored, "calib_output_err": err, **scores,
                       "fit_s": round(fit_s, 1), "eval_s": round(time.perf_counter() - t - fit_s, 1)}
                info["rows"].append(row)
                say(f"  {key} {q.name}{'' if variant == 'none' else '+' + variant:6s} {row['ratio']:.2f}x "
                    + " ".join(f"{k} {v:.4g}" for k, v in scores.items()) + f" calib err {err:.4f} [fit {fit_s:.0f}s]")
                write(report, args.out)
        del bench
    write(report, args.out)


if __name__ == "__main__":
    main()
