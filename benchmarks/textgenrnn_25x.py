"""The pretrained textgenrnn character LSTM with its LSTM weights 25x smaller (doped Kronecker paper, case 1).

    python benchmarks/textgenrnn_25x.py --recover-steps 300
    python benchmarks/textgenrnn_25x.py --minutes 4 --marks 3 --only doped-kron:none,doped-kron:blockwise --append

textgenrnn (Max Woolf's pretrained char LM, shipped in its PyPI package; see ../shared/DATA.md) has
two 128-unit LSTMs. Their four gate matrices (``rnn_*.weight_ih_l0``, ``rnn_*.weight_hh_l0``) are
compressed 25x in stored bytes (values and sparse indices counted) with kronc's ``lstm-25x``
policy (doped Kronecker), and, for comparison, with uniform magnitude pruning and uniform low rank at
the same bytes. Each is then recovered for the same number of steps by distillation from the dense
model on King James text (40-character contexts, the model's own), doped Kronecker with overlay
annealing and co-matrix dropout. Quality: bits per character on the ABC news text (first
``--eval-chars`` scored characters). Writes ``benchmarks/results/textgenrnn_25x.{md,json}``.

``--minutes M`` gives every run the same wall-clock budget instead (`timed_recovery`: steps set by timing a
few, bits per character at ``--marks`` points, ``textgenrnn_25x.png``); ``doped-kron:blockwise`` in ``--only``
adds a block-wise run (both LSTMs, then the attention pooling and output layer, one at a time, for
``--block-share`` of the minutes, then end-to-end distillation of the factors for the rest); ``--append``
keeps the earlier rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kronc
from kronc.plan import Plan
from kronc.planning import uniform_plan
from kronc.policies.model import Scope
from kronc.recover.schemes import denser_plan
from kronc.tools.data import abc_news_text, kjv_text
from kronc.tools.evaluate import bits_per_char, char_windows, encode_chars
from kronc.tools.models.textgenrnn import CONTEXT
from kronc.tools.zoo import load_textgenrnn

sys.path.insert(0, str(Path(__file__).parent))
from timed_recovery import Clock, Marks, make_schemes, mark_steps, plot_curves, steps_for  # noqa: E402  (benchmarks/timed_recovery.py)

RESULTS = Path(__file__).parent / "results"
BATCH = 64


class CharBatches:
    """Random ``(BATCH, 40)`` context windows of the King James text (the distillation data), seeded."""

    def __init__(self, vocab: dict[str, int], steps: int, seed: int = 0) -> None:
        ids, _ = encode_chars(vocab, kjv_text(max_chars=2_000_000))
        self.windows = char_windows(ids, CONTEXT)
        self.steps, self.seed = steps, seed

    def __iter__(self):  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.steps):
            yield self.windows[torch.randint(CONTEXT, len(self.windows), (BATCH,), generator=g)]


def plans(dense: nn.Module) -> dict[str, Plan]:
    example = (torch.zeros(1, CONTEXT, dtype=torch.long),)
    cap = kronc.capture(dense, example)
    sites = [s for s in cap.sites if s.kind == "lstm"]
    weights = {s.name: cap.weight(s) for s in sites}
    policy = kronc.load_policy("lstm-25x").model_copy(update={"scope": Scope(kinds=["lstm"])})
    doped_only = kronc.Policy.model_validate({"budget": "25x", "objective": "weight", "scope": {"kinds": ["lstm"]},
                                              "default_formats": [{"kind": "doped", "base": "kronecker"}]})
    return {
        "doped-kron": kronc.plan(cap, doped_only),
        "kronc-plan": kronc.plan(cap, policy),
        "magnitude": uniform_plan(sites, weights, "doped", 25),
        "lowrank": uniform_plan(sites, weights, "lowrank", 25),
    }


def run(name: str, dense: nn.Module, vocab: dict[str, int], plan: Plan, steps: int, schemes: str, eval_text: str,
        eval_chars: int, minutes: float = 0.0, marks: int = 1, bw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compress, measure, recover (``steps`` steps, or ``minutes`` with bits/char at ``marks`` points; ``schemes``
    "blockwise": block-wise reconstruction with ``bw`` settings first), measure."""
    blockwise = schemes == "blockwise"
    schemes = "" if blockwise else schemes
    anneal = "anneal" in schemes
    example = (torch.zeros(1, CONTEXT, dtype=torch.long),)
    student = kronc.apply(dense, denser_plan(plan, 4.0) if anneal else plan, example_inputs=example)
    plain = kronc.apply(dense, plan, example_inputs=example)

    def bpc(model: nn.Module) -> float:
        return bits_per_char(model, vocab, eval_text, max_chars=eval_chars)

    row: dict[str, Any] = {"method": name, "schemes": "blockwise" if blockwise else (schemes or "none"),
                           "ratio": plan.bytes_before / plan.bytes_after, "bpc_training_free": bpc(plain),
                           "minutes_budget": minutes}
    recipe = {"lr": 3e-3, "kd": 1.0, "hidden": 0.0, "lm": 0.0, "temperature": 1.0, "trainable": "factors",
              "progress": False, "log_every": 50, "train_mode": bool(make_schemes(schemes, plan))}
    t = time.perf_counter()
    curve = [{"seconds": 0.0, "steps": 0, "phase": "start", "value": bpc(student)}]
    eval_seconds = time.perf_counter() - t
    clock = Clock()
    budget = minutes * 60
    if blockwise:
        settings = {k: v for k, v in (bw or {}).items() if k != "share"}
        if budget:
            settings["max_seconds"] = (bw or {}).get("share", 0.5) * budget
        res = kronc.recover(student, dense, CharBatches(vocab, 10_000), method="blockwise", batch_size=BATCH,
                            seq_len=CONTEXT, **{**recipe, "trainable": "factors+norms+biases"}, blockwise=settings)
        row["blocks"] = [{"name": b.name, "loss_before": b.loss_before, "loss_after": b.loss_after, "steps": b.steps,
                          "kept_initial": b.kept_initial} for b in res.blocks]
        print(f"  {res}", flush=True)
        curve.append(clock.mark(student, bpc, sum(b.steps for b in res.blocks), "blocks"))
    probe = time.perf_counter()
    n = (steps_for(budget - clock.seconds(), student, dense, lambda k: CharBatches(vocab, k), recipe,
                   lambda: make_schemes(schemes, plan)) if budget else steps)
    clock.pause(probe)
    marker = Marks(bpc, mark_steps(n, marks), clock)
    if budget:  # the machine is shared: a step can take longer than the probe's; never more than a quarter over
        recipe["max_seconds"] = 1.25 * (budget - clock.seconds()) + marks * eval_seconds
    result = kronc.recover(student, dense, CharBatches(vocab, n), steps=n, schemes=[*make_schemes(schemes, plan), marker],
                           **recipe)
    row["recover_seconds"] = clock.seconds()
    row["recover_steps"] = len(result.history)
    row["bpc_recovered"] = bpc(student)
    row["curve"] = [*curve, *marker.curve, {"seconds": row["recover_seconds"], "steps": n, "phase": "end",
                                            "value": row["bpc_recovered"]}]
    print(f"  {name:11s} [{row['schemes']:10s}] {row['ratio']:.1f}x  bpc training-free {row['bpc_training_free']:.3f}"
          f"  recovered {row['bpc_recovered']:.3f}  ({row['recover_seconds']:.0f} s)", flush=True)
    return row


def render(record: dict[str, Any], png: str | None = None) -> str:
    dense = record["dense_bpc"]
    lines = [
        "# textgenrnn (pretrained char LSTM): LSTM weights 25x smaller", "",
        f"Evaluation: bits per character on the first {record['eval_chars']:,} scored characters of the ABC news "
        f"text (40-character contexts). Recovery: steps of {BATCH} King James contexts, "
        "logit distillation from the dense model (T=1), factors only (the row's steps; timed rows: the same minutes "
        "each, evaluation not counted; blockwise: the two LSTMs and the output layers reconstructed one at a time "
        "first). Bytes: the four LSTM gate matrices, values and sparse indices counted. The machine (2 cores) was "
        "shared with other jobs.", "",
        f"Dense: **{dense:.3f}** bits/char", "",
        "| method | training schemes | ratio | bpc training-free | bpc recovered | loss vs dense | steps | recovery time "
        "| command |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["runs"]:
        lines.append(f"| {r['method']} | {r['schemes']} | {r['ratio']:.1f}x | {r['bpc_training_free']:.3f} | "
                     f"{r['bpc_recovered']:.3f} | {100 * (r['bpc_recovered'] / dense - 1):+.1f}% | "
                     f"{r['recover_steps']} | {r['recover_seconds']:.0f} s | `{r.get('command', '')}` |")
    curves = [r for r in record["runs"] if len(r.get("curve", [])) > 2]
    if curves:
        lines += ["", "Bits/char along each timed run (minutes trained, steps; `blocks`: after the block phase):", ""]
        for r in curves:
            points = ", ".join(f"{c['value']:.3f} ({c['seconds'] / 60:.1f} min, {c['steps']}"
                               f"{' blocks' if c['phase'] == 'blocks' else ''})" for c in r["curve"])
            lines.append(f"- {r['method']} [{r['schemes']}]: {points}")
        if png:
            lines += ["", f"![bits per character against recovery minutes]({png})"]
    if record.get("notes"):  # findings written into the JSON by hand after the runs (rendered as they are)
        lines += ["", "## Notes", "", *record["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recover-steps", type=int, default=300)
    ap.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget per run instead of --recover-steps")
    ap.add_argument("--marks", type=int, default=3, help="with --minutes: measurements along each run")
    ap.add_argument("--eval-chars", type=int, default=10_000)
    ap.add_argument("--only", default="", help="comma-separated methods or method:schemes (default: all but blockwise)")
    ap.add_argument("--append", action="store_true", help="add the runs to the existing results")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bw-samples", type=int, default=256, help="blockwise: calibration contexts")
    ap.add_argument("--bw-epochs", type=int, default=10, help="blockwise: passes over them per block")
    ap.add_argument("--bw-lr", type=float, default=3e-3, help="blockwise: AdamW lr per block")
    ap.add_argument("--block-share", type=float, default=0.5, help="blockwise with --minutes: share of the block phase")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown and plot from the JSON")
    args = ap.parse_args()
    path = RESULTS / "textgenrnn_25x.json"
    if args.render:
        write(json.loads(path.read_text()))
        return
    torch.set_num_threads(args.threads)
    dense, vocab = load_textgenrnn()
    text = abc_news_text()
    record: dict[str, Any] = {"dense_bpc": bits_per_char(dense, vocab, text, max_chars=args.eval_chars),
                              "eval_chars": args.eval_chars, "runs": []}
    if args.append and path.is_file():
        old = json.loads(path.read_text())
        record["runs"] = [{**r, "command": r.get("command", old.get("command", f"python benchmarks/textgenrnn_25x.py "
                                                                               f"--recover-steps {old['recover_steps']}"))}
                          for r in old["runs"]]
    print(f"dense bits/char {record['dense_bpc']:.3f}", flush=True)
    table = plans(dense)
    for name in ("doped-kron", "kronc-plan"):
        print(f"{name}:\n{table[name].table()}", flush=True)
    runs = [("doped-kron", "anneal+cmr"), ("doped-kron", ""), ("kronc-plan", "anneal+cmr"), ("magnitude", ""),
            ("lowrank", ""), ("doped-kron", "blockwise")]
    picks = args.only.split(",") if args.only else []
    bw = {"samples": args.bw_samples, "epochs": args.bw_epochs, "lr": args.bw_lr, "share": args.block_share}
    command = ("python benchmarks/textgenrnn_25x.py " + " ".join(sys.argv[1:])).strip()
    for name, schemes in runs:
        key = f"{name}:{schemes or 'none'}"
        if (picks and name not in picks and key not in picks) or (schemes == "blockwise" and key not in picks):
            continue
        row = run(name, dense, vocab, table[name], args.recover_steps, schemes, text, args.eval_chars, args.minutes,
                  args.marks, bw)
        row["command"] = command
        record["runs"].append(row)
        write(record)  # after every run: a cut-short benchmark keeps what it measured
    print(render(record))


def write(record: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "textgenrnn_25x.json").write_text(json.dumps(record, indent=2))
    (RESULTS / "textgenrnn_25x.md").write_text(render(record, "textgenrnn_25x.png"))
    plot_curves(record["runs"], record["dense_bpc"], RESULTS / "textgenrnn_25x.png", "ABC news bits per character",
                "textgenrnn, LSTM weights 25x smaller: bits/char against recovery time", log=False)


if __name__ == "__main__":
    main()
