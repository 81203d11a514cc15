"""Speed of the ``kronc::`` ops against the dense ``F.linear`` they replace, on SmolLM2-135M shapes.

For each decoder projection shape of SmolLM2-135M, ``(out, in)`` = 576x576 (q, o), 192x576 (k, v),
1536x576 (gate, up) and 576x1536 (down), and 1, 16 and 512 tokens, every format is sized for about
4x compression (bytes, indices included) and timed through its op against ``F.linear`` with the
dense weight, in the same run. The table puts the time ratio beside the FLOP ratio (format FLOPs /
dense FLOPs per token): where time follows FLOPs the op is compute-bound and efficient; at one
token both sides are dominated by per-call overhead. ``ref us`` times the format's pure torch
reference function without the op wrapper, to show the custom-op dispatch cost.

    python benchmarks/ops_speed.py                 # CPU, float32
    python benchmarks/ops_speed.py --device cuda   # Triton kernels and the torch path vs cuBLAS, float16

Prints a markdown table; ``--out FILE`` also writes it (``.md``) or the rows (``.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from kronc.codegen import use_kernels
from kronc.formats import (
    BlockSparseSpec,
    DopedSpec,
    FormatSpec,
    KroneckerSpec,
    LowRankSpec,
    fit,
)
from kronc.reference.blocksparse import blocksparse_apply
from kronc.reference.kronecker import kronecker_apply
from kronc.reference.lowrank import lowrank_apply
from kronc.reference.sparse import overlay_apply

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
TOKENS = [1, 16, 512]
TARGET = 4.0  # compression ratio the formats are sized for


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def kron_candidates(shape: tuple[int, int], target: float, itemsize: int) -> list[KroneckerSpec]:
    """Kronecker specs within 10% of ``target`` compression whose factors are true matrices
    (every factor dimension at least 2: a 1-wide factor makes the sum a plain low-rank product)."""
    out, inn = shape
    dense = out * inn * itemsize
    found = []
    for m1 in divisors(out):
        for n1 in divisors(inn):
            m2, n2 = out // m1, inn // n1
            if min(m1, n1, m2, n2) < 2:
                continue
            terms = math.floor(out * inn / target / (m1 * n1 + m2 * n2))
            if terms < 1 or terms > min(m1 * n1, m2 * n2):
                continue
            spec = KroneckerSpec(a_shape=(m1, n1), terms=terms)
            if abs(dense / spec.nbytes(shape, itemsize) / target - 1) <= 0.1:
                found.append(spec)
    return found


def _imbalance(spec: KroneckerSpec, shape: tuple[int, int]) -> float:
    (m1, n1), (m2, n2) = spec.a_shape, spec.b_shape(shape)
    return abs(math.log(m1 / m2)) + abs(math.log(n1 / n2))


def specs_for(shape: tuple[int, int], itemsize: int) -> dict[str, FormatSpec]:
    """One spec per format at about ``TARGET`` x compression."""
    out, inn = shape
    dense = out * inn * itemsize
    krons = kron_candidates(shape, TARGET, itemsize)
    cheapest = min(krons, key=lambda s: (s.flops_per_token(shape), s.a_shape))
    balanced = min(krons, key=lambda s: (_imbalance(s, shape), s.a_shape))
    base = min(kron_candidates(shape, TARGET * 1.25, itemsize), key=lambda s: (s.flops_per_token(shape), s.a_shape))
    spare = dense / TARGET - base.nbytes(shape, itemsize)  # the overlay gets what the base leaves
    doped = max(
        (DopedSpec(base=base, density=k / 1000) for k in range(1, 200)),
        key=lambda s: s.nbytes(shape, itemsize) if s.nbytes(shape, itemsize) <= base.nbytes(shape, itemsize) + spare else -1,
    )
    pruned = max(
        (DopedSpec(density=k / 1000) for k in range(1, 400)),
        key=lambda s: s.nbytes(shape, itemsize) if s.nbytes(shape, itemsize) <= dense / TARGET else -1,
    )
    return {
        "lowrank": LowRankSpec(rank=math.floor(out * inn / TARGET / (out + inn))),
        "kron (fewest FLOPs)": cheapest,
        "kron (balanced)": balanced,
        "doped kron": doped,
        "sparse (pruning)": pruned,
        "blocksparse": BlockSparseSpec(block=(32, 32), density=round(1 / TARGET - 0.005, 3)),
    }


def reference(f: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """The format's pure torch reference function (no op wrapper), for the dispatch-cost column."""
    kind = f.spec.kind
    if kind == "lowrank":
        return lambda x: lowrank_apply(x, f.u, f.v)
    if kind == "kronecker":
        return lambda x: kronecker_apply(x, f.a, f.b)
    if kind == "blocksparse":
        rows, cols = f.index.decode()
        return lambda x: blocksparse_apply(x, f.blocks, rows, cols, f.shape[0])
    rows, cols = f.overlay.index.decode()
    vals, out = f.overlay.values, f.shape[0]
    if f.base is None:
        return lambda x: overlay_apply(x, rows, cols, vals, out)
    return lambda x: kronecker_apply(x, f.base.a, f.base.b) + overlay_apply(x, rows, cols, vals, out)


def timeit(fn: Callable[[], object], device: str, budget_s: float) -> float:
    """Seconds per call: the fastest of several timed blocks, after warm-up (autotuning on CUDA).

    On CPU the clock is the calling thread's CPU time (run with one torch thread, the default
    here), so other processes competing for the cores do not inflate the numbers; on CUDA it is
    wall-clock time around synchronised blocks.
    """
    on_cuda = device == "cuda"
    clock = time.perf_counter if on_cuda else time.thread_time
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    start = clock()
    fn()
    sync()
    once = max(clock() - start, 1e-7)
    per_block = max(1, int(budget_s / 7 / once))
    samples = []
    for _ in range(7):
        sync()
        start = clock()
        for _ in range(per_block):
            fn()
        sync()
        samples.append((clock() - start) / per_block)
    return min(samples)


def run(device: str, dtype: torch.dtype, budget_s: float, shapes: list[tuple[int, int]], tokens: list[int]) -> list[dict]:
    rows = []
    itemsize = torch.empty(0, dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        weight = torch.randn(*shape, generator=gen) / math.sqrt(shape[1])
        dense_flops = 2 * shape[0] * shape[1]
        dense_bytes = shape[0] * shape[1] * itemsize
        fitted = {name: fit(weight, spec).to(device, dtype) for name, spec in specs_for(shape, itemsize).items()}
        w = weight.to(device, dtype)
        for t in tokens:
            x = torch.randn(t, shape[1], generator=gen).to(device, dtype)
            with torch.inference_mode():
                dense_s = timeit(lambda x=x, w=w: F.linear(x, w), device, budget_s)
                for name, f in fitted.items():
                    f(x)  # decode indices once, as a model's first call does
                    ref = reference(f)
                    op_s = timeit(lambda f=f, x=x: f(x), device, budget_s)
                    ref_s = timeit(lambda ref=ref, x=x: ref(x), device, budget_s)
                    rows.append({
                        "shape": f"{shape[0]}x{shape[1]}", "tokens": t, "format": name, "spec": f.spec.describe(),
                        "compression": dense_bytes / f.nbytes(), "flop_ratio": f.flops_per_token() / dense_flops,
                        "time_ratio": op_s / dense_s, "op_us": op_s * 1e6, "ref_us": ref_s * 1e6, "dense_us": dense_s * 1e6,
                    })
    return rows


def markdown(rows: list[dict], title: str) -> str:
    lines = [
        f"### {title}", "",
        "| shape (out x in) | tokens | format | spec | compression | FLOP ratio | time ratio | op us | ref us | dense us |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['format']} | {r['spec']} | {r['compression']:.2f}x | "
            f"{r['flop_ratio']:.2f} | {r['time_ratio']:.2f} | {r['op_us']:.1f} | {r['ref_us']:.1f} | {r['dense_us']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--budget", type=float, default=0.15, help="seconds of timing per measurement")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU-time clock is exact)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("float16" if args.device == "cuda" else "float32"))
    tokens = [int(t) for t in args.tokens.split(",")]
    sections, everything = [], {}
    modes = ["auto", "torch"] if args.device == "cuda" else ["auto"]
    for mode in modes:
        with use_kernels(mode):  # type: ignore[arg-type]
            rows = run(args.device, dtype, args.budget, SHAPES, tokens)
        label = {"auto": "Triton kernels" if args.device == "cuda" else "torch path"}.get(mode, "torch path")
        baseline = "cuBLAS" if args.device == "cuda" else "dense F.linear"
        name = f"{args.device}, {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads: {label} vs {baseline}"
        sections.append(markdown(rows, name))
        everything[name] = rows
    text = "\n\n".join(sections)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(everything, indent=1) if args.out.suffix == ".json" else text + "\n")


if __name__ == "__main__":
    main()
