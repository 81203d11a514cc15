"""Layer-level check of the GPTQ-style fit against round to nearest, in sample and held out.

    python benchmarks/gptq_heldout.py smollm2   (or minilm)

For 16 (SmolLM2) / 12 (MiniLM) linears spread over the depth, the Gram matrix of their inputs is
collected on three texts: the King James windows 0-7 (the calibration used by ``quality.py``), King
James windows 8-15 (held out, same text) and ABC news windows 0-7 (the evaluation text); windows of
512 tokens (SmolLM2) / 256 (MiniLM). GPTQ is fitted on the calibration Gram matrix at damping 0.01,
0.1 and 1.0 (fraction of its mean diagonal). Printed: the relative output error
``||(W - Ŵ) S|| / ||W S||`` (``S Sᵀ`` = the Gram matrix of each text) per site and the mean over sites,
as ``calibration / held-out King James / ABC news``.
"""

from __future__ import annotations

import sys

import torch

from kronc.tools.data import abc_news_text, kjv_text
from kronc.tools.zoo import load_minilm, load_smollm2
from kronc.values import Precision, decode, encode
from kronc.values.fits import fit_gptq


def main() -> None:
    torch.set_num_threads(1)
    which = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    if which == "smollm2":
        model, tok = load_smollm2()
        names = [f"model.layers.{i}.{m}" for i in (0, 10, 20, 29)
                 for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]
        win = 512
    elif which == "minilm":
        model, tok = load_minilm()
        names = [f"encoder.layer.{i}.{m}" for i in (0, 3, 5)
                 for m in ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense")]
        win = 256
    else:
        raise SystemExit(f"model {which!r}: expected smollm2 or minilm")
    kjv = tok(kjv_text(max_chars=400_000), return_tensors="pt", add_special_tokens=False).input_ids[0]
    abc = tok(abc_news_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    sets = {"calib": [kjv[i * win:(i + 1) * win] for i in range(8)],
            "kjv_held": [kjv[i * win:(i + 1) * win] for i in range(8, 16)],
            "abc": [abc[i * win:(i + 1) * win] for i in range(8)]}
    grams: dict[tuple[str, str], torch.Tensor] = {}
    current = [""]

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(mod, inp, out) -> None:  # type: ignore[no-untyped-def]
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            key = (current[0], name)
            grams[key] = grams.get(key, torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)) + x.T @ x
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        for key, windows in sets.items():
            current[0] = key
            for w in windows:
                model(input_ids=w[None])
    for h in handles:
        h.remove()

    def err(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
        d, wd = (w - wq).double(), w.double()
        return float(((d @ h) * d).sum() / ((wd @ h) * wd).sum()) ** 0.5

    cfgs = [Precision(dtype="int4", group_size=32), Precision(dtype="int4", group_size=32, symmetric=False),
            Precision(dtype="int3", group_size=64), Precision(dtype="int2", group_size=64, symmetric=False)]
    fits = ("rtn", "gptq0.01", "gptq0.1", "gptq1.0")
    total: dict[tuple[str, str, str], list[float]] = {}
    for n in names:
        w = model.get_submodule(n).weight.detach().float()
        hc = grams[("calib", n)]
        d = torch.diag(hc)
        print(n, tuple(w.shape), f"diag max/median {float(d.max() / d.median()):.0f}", flush=True)
        for p in cfgs:
            variants = {"rtn": decode(encode(w, p))}
            for damp in (0.01, 0.1, 1.0):
                variants[f"gptq{damp}"] = fit_gptq(w, p, hc, damp=damp).values().reshape(w.shape)
            line = [f"  {p.describe():9s}"]
            for k, v in variants.items():
                es = [err(w, v, grams[(s, n)]) for s in sets]
                for s, e in zip(sets, es, strict=True):
                    total.setdefault((p.describe(), k, s), []).append(e)
                line.append(f"{k}: " + "/".join(f"{e:.4f}" for e in es))
            print("  ".join(line), flush=True)
    print("MEAN over sites (calib / kjv_held / abc):")
    for p in cfgs:
        for k in fits:
            print(f"  {p.describe():9s} {k:9s}", "/".join(f"{sum(total[(p.describe(), k, s)]) / len(names):.4f}" for s in sets))


if __name__ == "__main__":
    main()
