"""Recovery on SmolLM2-135M: kronc's plan, then distillation for a fixed CPU time per budget.

    python benchmarks/recovery.py --budgets 4x,10x,25x --minutes 6 --segments 3

For each budget of the decoder linears (q, k, v, o, gate, up, down of all 30 layers; embeddings and
the tied LM head dense): kronc's data-aware plan (calibration: 4 windows of 512 King James tokens),
then `kronc.recover` for ``--minutes`` of training on King James text (logit KL at T=2 plus
intermediate-layer distillation of every decoder layer's hidden state, factors + norms + biases
trained, AdamW at a constant ``--lr``, ``--batch`` windows of ``--seq-len`` tokens per step). The run is
cut into ``--segments`` equal time slices, resumed from its checkpoint each time, and perplexity on the
ABC news text (first ``--windows`` windows of 512 tokens) is measured after each slice (evaluation time
is not counted in the budget), giving perplexity against training time. Writes
``benchmarks/results/recovery.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import kronc
from kronc.data import abc_news_text, kjv_text
from kronc.evaluate import perplexity
from kronc.planning import collect_input_moments
from kronc.policies import Policy, resolve
from kronc.zoo import load_smollm2

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="4x,10x,25x")
    ap.add_argument("--minutes", type=float, default=6.0, help="training time per budget")
    ap.add_argument("--segments", type=int, default=3, help="perplexity checkpoints along the run")
    ap.add_argument("--windows", type=int, default=4, help="ABC news windows of 512 tokens for perplexity")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_smollm2()
    text = abc_news_text()
    kjv = tok(kjv_text(max_chars=3_000_000), return_tensors="pt", add_special_tokens=False).input_ids[0]
    calib, train = kjv[: 4 * 512], kjv[4 * 512:]

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, tok, text, max_windows=args.windows, progress=False).ppl

    dense = ppl(model)
    print(f"dense ppl {dense:.2f} ({args.windows} windows of 512 ABC news tokens); {train.numel():,} KJV training "
          "tokens", flush=True)
    cap = kronc.capture(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    record: dict[str, Any] = {"dense_ppl": dense, "windows": args.windows, "minutes": args.minutes,
                              "seq_len": args.seq_len, "batch": args.batch, "lr": args.lr, "runs": []}
    moments: dict[str, torch.Tensor] | None = None
    for budget in args.budgets.split(","):
        policy = Policy(budget=budget, objective="data")
        if moments is None:
            res = resolve(policy, cap.sites, warn=False)
            sites = [s for s in cap.sites if res[s.name].in_scope]
            moments = collect_input_moments(model, sites, [calib[i * 512:(i + 1) * 512][None] for i in range(4)])
        t = time.perf_counter()
        plan = kronc.plan(cap, policy, moments=moments)
        student = kronc.apply(cap, plan, moments=moments)
        compile_s = time.perf_counter() - t
        kinds: dict[str, int] = {}
        for d in plan.decisions:
            kinds[d.spec.kind] = kinds.get(d.spec.kind, 0) + 1
        curve = [{"seconds": 0.0, "tokens": 0, "ppl": ppl(student)}]
        print(f"{budget}: plan {kinds}, {plan.bytes_before / plan.bytes_after:.2f}x, compiled in {compile_s:.0f} s; "
              f"training-free ppl {curve[0]['ppl']:.2f}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = str(Path(tmp) / "recover.pt")
            for seg in range(args.segments):
                result = kronc.recover(
                    student, model, train, steps=100_000, schedule="constant", warmup=0.0, lr=args.lr,
                    batch_size=args.batch, seq_len=args.seq_len, kd=1.0, hidden=1.0, lm=0.0, temperature=2.0,
                    trainable="factors+norms+biases", max_seconds=args.minutes * 60 / args.segments,
                    checkpoint_path=ckpt, checkpoint_every=1_000_000, resume=seg > 0, progress=False, log_every=20)
                last = result.history[-1]
                curve.append({"seconds": last.seconds, "tokens": last.tokens, "steps": last.step + 1,
                              "kd": last.parts.get("kd"), "ppl": ppl(student)})
                print(f"  {budget} after {last.seconds / 60:.1f} min ({last.step + 1} steps, {last.tokens:,} tokens): "
                      f"ppl {curve[-1]['ppl']:.2f}", flush=True)
        record["runs"].append({"budget": budget, "ratio": plan.bytes_before / plan.bytes_after, "formats": kinds,
                               "compile_seconds": compile_s, "curve": curve})
    command = ("python benchmarks/recovery.py " + " ".join(sys.argv[1:])).strip()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recovery.json").write_text(json.dumps(record, indent=2))
    (RESULTS / "recovery.md").write_text(render(record, command))
    print(render(record, command))


def render(record: dict[str, Any], command: str) -> str:
    dense = record["dense_ppl"]
    lines = [
        "# Recovery on SmolLM2-135M: perplexity against CPU training time", "",
        f"Command: `{command}`", "",
        f"Perplexity on the first {record['windows']} windows of 512 ABC news tokens (dense **{dense:.2f}**). "
        f"Training: King James text, {record['batch']}x{record['seq_len']} tokens per step, AdamW lr {record['lr']:g} "
        f"constant, logit KL (T=2) + hidden-state distillation, {record['minutes']:g} min per budget on this 2-core "
        "machine (shared with other jobs while measured).", "",
        "| budget | ratio | formats | training-free | " + " | ".join(
            f"after {c['seconds'] / 60:.1f} min" for c in record["runs"][0]["curve"][1:]) + " | final / dense |",
        "|---|---|---|---|" + "---|" * (len(record["runs"][0]["curve"]) - 1) + "---|",
    ]
    for r in record["runs"]:
        formats = ", ".join(f"{k} {v}" for k, v in sorted(r["formats"].items()))
        cells = " | ".join(f"{c['ppl']:.1f}" for c in r["curve"][1:])
        lines.append(f"| {r['budget']} | {r['ratio']:.2f}x | {formats} | {r['curve'][0]['ppl']:.1f} | {cells} | "
                     f"{r['curve'][-1]['ppl'] / dense:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
