"""Block-structured pruning and low-rank prune-and-factorize on a BERT encoder (all-MiniLM-L6-v2).

    python benchmarks/encoder_pruning.py --budgets 2x,5x --steps 100

Two seed papers, on the encoder's 36 transformer linears (q, k, v, attention output, intermediate,
output of 6 layers; the pooler is unused by mean pooling and left alone). Every method ends at the same
stored bytes (``--budgets`` of the linears' dense bytes, sparse and block indices counted) and gets the
same ``--steps`` of fine-tuning by distillation from the dense model (relative squared error of the
last hidden state and of every layer's hidden state) on King James text, 128-token windows:

* **block-structured pruning** (reweighted group lasso): ``--steps`` of distillation with the
  reweighted group-lasso penalty on 32x32 blocks, then whole blocks pruned to the budget and
  ``--steps`` of masked fine-tuning, then stored as kronc ``blocksparse``; against the same block
  pruning without the group-lasso phase, and unstructured magnitude pruning (kronc ``doped`` with no
  base) at the same bytes;
* **low-rank prune-and-factorize** (LPAF): ``--steps`` of distillation gathering first-order
  movement scores, movement pruning to 50%, sparsity-aware SVD at ranks chosen per layer for the
  budget (mixed ranks), ``--steps`` of fine-tuning; against plain truncated SVD at a uniform ratio.

Quality: Pearson correlation of embedding cosine similarity with human ratings on the Lee
50-document set, and 5-fold linear-probe accuracy on the 200 Pang-Lee sentences. Writes
``benchmarks/results/encoder_pruning.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kronc
from kronc.planning import uniform_plan
from kronc.recover.schemes import (
    MovementScores,
    ReweightedGroupLasso,
    lpaf_factorize,
    movement_prune,
    prune_blocks,
)
from kronc.tools.data import kjv_text, lee_documents, pang_lee_sentences
from kronc.tools.evaluate import probe_accuracy, similarity_pearson
from kronc.tools.zoo import load_minilm

RESULTS = Path(__file__).parent / "results"
BLOCK = (32, 32)
EXCLUDE = "pooler"
LPAF_DENSITY = 0.5


class Bench:
    def __init__(self, steps: int, batch: int, seq_len: int) -> None:
        self.teacher, self.tok = load_minilm()
        self.teacher.eval()
        self.docs, self.sims = lee_documents()
        self.sentences, self.labels = pang_lee_sentences()
        # tokenized once; the model's 512-position limit does not apply to the stream (windows are shorter)
        self.ids = torch.tensor(self.tok(kjv_text(max_chars=1_500_000), add_special_tokens=False,
                                         verbose=False).input_ids, dtype=torch.long)
        self.steps, self.batch, self.seq_len = steps, batch, seq_len
        example = {"input_ids": torch.zeros(1, 16, dtype=torch.long)}
        self.captured = kronc.capture(self.teacher, example)
        self.sites = [s for s in self.captured.sites if s.kind == "linear" and not s.name.startswith(EXCLUDE)]
        self.weights = {s.name: self.captured.weight(s) for s in self.sites}
        self.dense_bytes = sum(s.nbytes for s in self.sites)

    def quality(self, model: nn.Module) -> dict[str, float]:
        return {"pearson": similarity_pearson(model, self.tok, self.docs, self.sims),
                "probe": probe_accuracy(model, self.tok, self.sentences, self.labels)}

    def distill(self, student: nn.Module, schemes: list[Any], trainable: str, seed: int = 0) -> float:
        t = time.perf_counter()
        kronc.recover(student, self.teacher, self.ids, steps=self.steps, batch_size=self.batch,
                      seq_len=self.seq_len, lr=1e-4 if trainable == "all" else 5e-4, kd=1.0, hidden=1.0, lm=0.0,
                      trainable=trainable, schemes=schemes, progress=False, seed=seed, log_every=max(1, self.steps // 5))
        return time.perf_counter() - t

    def stored_bytes(self, model: nn.Module) -> int:
        """Bytes of the linears in scope as they are now stored (dense ones at full size)."""
        total = 0
        for s in self.sites:
            module = model.get_submodule(s.name.rsplit(".", 1)[0])
            fmt = getattr(module, "weight_format", None)
            total += fmt.nbytes() if fmt is not None else s.nbytes
        return total


def row(bench: Bench, method: str, budget: str, model: nn.Module, before: dict[str, float], seconds: float,
        steps: int) -> dict[str, Any]:
    after = bench.quality(model)
    stored = bench.stored_bytes(model)
    r = {"method": method, "budget": budget, "ratio": bench.dense_bytes / stored, "steps": steps, "seconds": seconds,
         "pearson_before": before["pearson"], "probe_before": before["probe"], "pearson": after["pearson"],
         "probe": after["probe"]}
    print(f"  {budget} {method:22s} {r['ratio']:.2f}x  pearson {before['pearson']:.3f} -> {after['pearson']:.3f}  "
          f"probe {before['probe']:.3f} -> {after['probe']:.3f}  ({seconds:.0f} s, {steps} steps)", flush=True)
    return r


def plan_baseline(bench: Bench, fmt: str, ratio: float) -> nn.Module:
    plan = uniform_plan(bench.sites, bench.weights, fmt, ratio)
    return kronc.apply(bench.captured, plan)


METHODS = ("magnitude", "block", "lasso", "svd", "lpaf")
LABELS = {"magnitude": "magnitude (unstructured)", "block": "block pruning", "lasso": "group lasso + block pruning",
          "svd": "truncated SVD", "lpaf": "LPAF (movement + SA-SVD)"}


def run_budget(bench: Bench, budget: str, methods: tuple[str, ...] = METHODS) -> list[dict[str, Any]]:
    ratio = kronc.Budget.parse(budget).value
    out: list[dict[str, Any]] = []
    n = bench.steps

    # unstructured magnitude pruning at the same bytes, then fine-tuning of the kept values
    if "magnitude" in methods:
        student = plan_baseline(bench, "doped", ratio)
        before = bench.quality(student)
        out.append(row(bench, LABELS["magnitude"], budget, student, before, bench.distill(student, [], "factors"), n))

    # block pruning by block norm, no group lasso, then masked fine-tuning
    if "block" in methods:
        student = copy.deepcopy(bench.teacher)
        mask = prune_blocks(student, budget, BLOCK, exclude=EXCLUDE)
        before = bench.quality(student)
        seconds = bench.distill(student, [mask], "all")
        mask.to_blocksparse(student)
        out.append(row(bench, LABELS["block"], budget, student, before, seconds, n))

    # reweighted group lasso, then block pruning and masked fine-tuning
    if "lasso" in methods:
        student = copy.deepcopy(bench.teacher)
        seconds = bench.distill(student, [ReweightedGroupLasso(BLOCK, strength=2e-3, refresh_every=20, exclude=EXCLUDE)],
                                "all")
        mask = prune_blocks(student, budget, BLOCK, exclude=EXCLUDE)
        before = bench.quality(student)
        seconds += bench.distill(student, [mask], "all")
        mask.to_blocksparse(student)
        out.append(row(bench, LABELS["lasso"], budget, student, before, seconds, 2 * n))

    # plain truncated SVD at a uniform ratio, then fine-tuning of the factors
    if "svd" in methods:
        student = plan_baseline(bench, "lowrank", ratio)
        before = bench.quality(student)
        out.append(row(bench, LABELS["svd"], budget, student, before, bench.distill(student, [], "factors"), n))

    # LPAF: movement scores while fine-tuning, movement pruning, sparsity-aware SVD with mixed ranks, fine-tuning
    if "lpaf" in methods:
        student = copy.deepcopy(bench.teacher)
        scores = MovementScores(exclude=EXCLUDE)
        seconds = bench.distill(student, [scores], "all")
        masks = movement_prune(student, LPAF_DENSITY, scores, exclude=EXCLUDE)
        lpaf_factorize(student, budget=budget, masks=masks, exclude=EXCLUDE, iters=20)
        before = bench.quality(student)
        seconds += bench.distill(student, [], "factors")
        out.append(row(bench, LABELS["lpaf"], budget, student, before, seconds, 2 * n))
    return out


def render(record: dict[str, Any], command: str) -> str:
    d = record["dense"]
    lines = [
        "# all-MiniLM-L6-v2: block-structured pruning and low-rank prune-and-factorize", "",
        f"Command: `{command}`", "",
        f"Linears in scope: {record['sites']} (pooler excluded), {record['dense_bytes'] / 1e6:.1f} MB dense. Fine-tuning: "
        f"distillation from the dense model on King James text, {record['steps']} steps of {record['batch']}x"
        f"{record['seq_len']} tokens per phase (group lasso and LPAF have two phases). Quality: Pearson r with human "
        "similarity on the Lee 50 documents; 5-fold linear-probe accuracy on the 200 Pang-Lee sentences. "
        "'before' = right after pruning/factorizing, before the final fine-tuning.", "",
        f"Dense: Pearson **{d['pearson']:.3f}**, probe **{d['probe']:.3f}**", "",
        "| budget | method | ratio | Pearson before | Pearson after | probe before | probe after | steps | time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["runs"]:
        lines.append(f"| {r['budget']} | {r['method']} | {r['ratio']:.2f}x | {r['pearson_before']:.3f} | "
                     f"{r['pearson']:.3f} | {r['probe_before']:.3f} | {r['probe']:.3f} | {r['steps']} | "
                     f"{r['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="2x,5x")
    ap.add_argument("--steps", type=int, default=100, help="fine-tuning steps per phase")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--update", action="store_true",
                    help="replace only these methods' rows in the existing results (same steps, batch, length)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    methods = tuple(args.methods.split(","))
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown --methods {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    bench = Bench(args.steps, args.batch, args.seq_len)
    dense = bench.quality(bench.teacher)
    print(f"dense: pearson {dense['pearson']:.3f} probe {dense['probe']:.3f}; {len(bench.sites)} linears, "
          f"{bench.dense_bytes / 1e6:.1f} MB", flush=True)
    record: dict[str, Any] = {"dense": dense, "sites": len(bench.sites), "dense_bytes": bench.dense_bytes,
                              "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "runs": []}
    command = ("python benchmarks/encoder_pruning.py " + " ".join(sys.argv[1:])).strip()
    if args.update:
        old = json.loads((RESULTS / "encoder_pruning.json").read_text())
        settings = ("steps", "batch", "seq_len")
        if any(old[k] != record[k] for k in settings):
            ap.error(f"--update: the existing results used {', '.join(f'{k}={old[k]}' for k in settings)}")
        rerun = {LABELS[m] for m in methods}
        record["runs"] = [r for r in old["runs"] if r["method"] not in rerun]
        command = old.get("command", command) + f"; then {command}"
    record["command"] = command
    RESULTS.mkdir(exist_ok=True)
    budgets = args.budgets.split(",")
    order = {(b, LABELS[m]): i for i, (b, m) in enumerate((b, m) for b in budgets for m in METHODS)}
    for budget in budgets:  # written after every budget: a cut-short run keeps what it measured
        record["runs"].extend(run_budget(bench, budget, methods))
        record["runs"].sort(key=lambda r: order.get((r["budget"], r["method"]), len(order)))
        (RESULTS / "encoder_pruning.json").write_text(json.dumps(record, indent=2))
        (RESULTS / "encoder_pruning.md").write_text(render(record, command))
    print(render(record, command))


if __name__ == "__main__":
    main()
