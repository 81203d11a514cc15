"""CPU speed of ``kronc::quant_linear``'s paths against the dense fp32 ``F.linear``, same run.

For the SmolLM2-135M linear shapes (576x576 attention, 1536x576 gate/up, 576x1536 down), at 1 token
(decode) and 512 tokens (prefill), times: fp32 ``F.linear``; ``aten._weight_int8pack_mm`` (int8,
per-row scale); ``aten._weight_int4pack_mm_for_cpu`` (int4, group 32; packed layout cached, as the
op does); dequantize-then-``F.linear`` for int8, int4, int3, int2; and the same with bfloat16
activations (``bf16 ...`` columns; ratios still against the fp32 dense time). Each figure is the
median of ``--reps`` timings of ``--iters`` calls, methods interleaved so load changes from other
processes hit them alike; cells are microseconds per call and ``dense time / method time`` (above
1 = faster than dense). `kronc.codegen.ops.quant.cpu_path` is chosen from these numbers.

    python benchmarks/quant_ops.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kronc.codegen.ops.quant import quant_linear_cpu
from kronc.values import Precision, QuantizedTensor

SHAPES = [(576, 576), (1536, 576), (576, 1536)]
METHODS = ["dense", "int8pack", "int4pack", "int8 deq", "int4 deq", "int3 deq", "int2 deq",
           "bf16 dense", "bf16 int8pack", "bf16 int4pack", "bf16 int4 deq"]


def timed(fn: Callable[[], object], iters: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def methods_for(w: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """One zero-argument call per method, on the weight ``w`` and activations ``x`` (and their bf16)."""
    qts = {
        8: QuantizedTensor.from_float(w, Precision(dtype="int8")),
        4: QuantizedTensor.from_float(w, Precision(dtype="int4", group_size=32)),
        3: QuantizedTensor.from_float(w, Precision(dtype="int3", group_size=32)),
        2: QuantizedTensor.from_float(w, Precision(dtype="int2", group_size=32)),
    }
    wb, xb = w.bfloat16(), x.bfloat16()

    def call(bits: int, path: str, act: torch.Tensor) -> Callable[[], object]:
        q = qts[bits]
        return lambda: quant_linear_cpu(act, q.codes, q.scales, q.minima, None, bits, path)

    return {
        "dense": lambda: F.linear(x, w),
        "int8pack": call(8, "int8pack", x), "int4pack": call(4, "int4pack", x),
        "int8 deq": call(8, "dequant", x), "int4 deq": call(4, "dequant", x),
        "int3 deq": call(3, "dequant", x), "int2 deq": call(2, "dequant", x),
        "bf16 dense": lambda: F.linear(xb, wb),
        "bf16 int8pack": call(8, "int8pack", xb), "bf16 int4pack": call(4, "int4pack", xb),
        "bf16 int4 deq": call(4, "dequant", xb),
    }


def row(out: int, inn: int, tokens: int, reps: int, iters: int, g: torch.Generator) -> str:
    fns = methods_for(torch.randn(out, inn, generator=g) * 0.05, torch.randn(tokens, inn, generator=g))
    iters = iters or (200 if tokens == 1 else max(3, 2000 // tokens))
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(reps):
        for m in METHODS:
            times[m].append(timed(fns[m], iters))
    med = {m: statistics.median(t) for m, t in times.items()}
    cells = [f"{med[m] * 1e6:.0f} ({med['dense'] / med[m]:.2f}x)" for m in METHODS]
    return f"| {out}x{inn} | {tokens} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--iters", type=int, default=0, help="calls per timing (0: 200 at 1 token, fewer for more)")
    ap.add_argument("--shapes", default="", help="comma list like 576x576 (default: the SmolLM2 shapes)")
    ap.add_argument("--tokens", default="1,512", help="comma list of token counts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads; us per call (ratio = fp32 dense / method)")
    print("| out x in | tokens | " + " | ".join(METHODS) + " |")
    print("|---" * (len(METHODS) + 2) + "|")
    with torch.inference_mode():
        for out, inn in shapes:
            for tokens in (int(t) for t in args.tokens.split(",")):
                print(row(out, inn, tokens, args.reps, args.iters, g), flush=True)


if __name__ == "__main__":
    main()
