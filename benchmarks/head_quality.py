"""What storing SmolLM2's tied embedding/LM head at a lower precision costs in perplexity, alone.

The dense model against the same model with only the tied head compressed by a policy ``fixed`` entry
(`kronc.Policy.fixed`: outside the budget, one stored copy, lookups decode the rows they gather), on
the project's evaluation (ABC news, ``--windows`` windows of 512 tokens; the issue's table uses 8).
The scope is a single decoder linear kept dense (a policy needs one in-scope site), so the head is
the only change. Float32 activations of 512 tokens run the dequantized float32 product; "decode path"
repeats the measurement with the packed bf16 kernels at every size (what decoding runs).

    python benchmarks/head_quality.py --heads int8,int4g64,int4g32 --windows 8

Writes ``benchmarks/results/head_quality.{md,json}`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import kronc
from kronc.policies import Policy

sys.path.insert(0, str(Path(__file__).parent))
from speed import HEAD_PRECISIONS, RESULTS, packed_kernels_everywhere  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default="int8,int4g64", help=f"comma-separated, from {list(HEAD_PRECISIONS)}")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "head_quality")
    args = ap.parse_args()
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    bad = [h for h in heads if h not in HEAD_PRECISIONS]
    if bad:
        ap.error(f"unknown head precisions {bad}; allowed: {list(HEAD_PRECISIONS)}")
    torch.set_num_threads(args.threads)
    from kronc.tools.data import abc_news_text
    from kronc.tools.evaluate import perplexity
    from kronc.tools.zoo import load_smollm2

    model, tok = load_smollm2()
    text = abc_news_text()

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, tok, text, window=512, max_windows=args.windows, progress=False).ppl

    rows = [{"head": "fp32 (dense model)", "head MB": model.lm_head.weight.numel() * 4 / 1e6, "ppl": ppl(model)}]
    print(rows[-1], flush=True)
    for head in heads:
        t = time.perf_counter()
        policy = Policy(budget="1x", scope={"include": ["model.layers.0.self_attn.q_proj"]},
                        default_formats=[{"kind": "dense"}],
                        fixed=[{"match": "lm_head", "precision": HEAD_PRECISIONS[head], "name": "head"}])
        small = kronc.compile(model, policy=policy)
        d = small.kronc_plan["model.embed_tokens.weight"]
        row = {"head": head, "head MB": d.bytes_after / 1e6, "head error": d.error, "ppl": ppl(small)}
        with packed_kernels_everywhere():
            row["ppl decode path"] = ppl(small)
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        print(row, flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/head_quality.py", *sys.argv[1:]])
    dense = rows[0]["ppl"]
    lines = ["# SmolLM2-135M: the tied embedding/LM head at a lower precision, alone", "", f"Command: `{command}`", "",
             f"ABC news, {args.windows} windows of 512 tokens; every decoder linear dense. ppl: float32 activations "
             "(the head's product dequantized); decode path: packed bf16 kernels at every size.", "",
             "| head | head MB | rel. weight error | ppl (x dense) | ppl decode path |", "|---|---|---|---|---|"]
    for r in rows:
        err = "-" if r.get("head error") is None else f"{r['head error']:.4f}"
        dp = "-" if r.get("ppl decode path") is None else f"{r['ppl decode path']:.3f}"
        lines.append(f"| {r['head']} | {r['head MB']:.1f} | {err} | {r['ppl']:.3f} ({r['ppl'] / dense:.4f}x) | {dp} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
