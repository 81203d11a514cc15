"""Inference speed, memory and size of SmolLM2-135M, dense and compressed, under eager and torch.compile.

For the dense model and a compressed one per (policy, budget), every number is measured in the
same run and given as a ratio against the dense model:

* **prefill**: latency of one forward pass over 512 tokens (batch 1), building the KV cache and
  the last position's logits, as ``generate`` does;
* **decode**: greedy ``generate`` with the KV cache at batch 1 (``use_cache=True``,
  ``min_new_tokens = max_new_tokens``); tokens per second of the decode steps alone,
  ``N / (t(N + 1 new tokens) - t(1 new token))`` from a 32-token prompt;
* both **eager** and under **torch.compile** (inductor, ``model.forward`` compiled; the compile
  time is the first prefill plus the first ``generate``);
* **weights**: bytes of the parameters and buffers the model holds (tied tensors once), which is
  also what one decode step reads;
* **peak memory**: weights plus the peak growth of the process's resident memory (RSS, sampled
  every 0.5 ms by a thread, after ``gc`` and ``malloc_trim``) during one eager 512-token prefill.
  ``tracemalloc`` does not see torch's allocations, so RSS is what is measured;
* **disk**: bytes written by `kronc.save` (safetensors + manifest); the dense model as one
  safetensors file of its state dict;
* **compile time** of `kronc.compile` itself, split by stage (capture, plan, apply = fit + rewrite);
* **perplexity** on ABC news (the evaluation text; 512-token windows) as a quality check, so a
  faster plan is not mistaken for a free one.

Policies (the scope is every decoder linear: q, k, v, o, gate, up, down of the 30 layers; the
embedding and the tied LM head stay dense and outside the budget):

* ``speed``: low rank (or dense) only. A low-rank weight at a ratio r costs 1/r of the dense
  FLOPs and bytes as two plain GEMMs, so on CPU it runs faster in proportion;
* ``quality``: every format (low rank, Kronecker, doped Kronecker, block-sparse, dense), the
  planner's least-error choice. Doped and block-sparse formats are gather/scatter kernels on CPU
  and slower than the dense GEMM they replace, so this plan is smaller but not faster here;
* ``int8``: every decoder linear at int8, one scale per row (budget fixed at 3.9x);
  ``int4``: the shipped ``int4-kernels`` policy (int8 or int4 per site). ``kronc::quant_linear``
  runs aten's packed kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``, the latter also
  for int3/int2) on bfloat16 activations: those of a bf16 model up to 256 tokens, those of a float32
  model at decode sizes (cast to bf16); float32 prefill dequantizes and runs a GEMM.

``--dense-bf16`` adds the dense model cast to bfloat16 as a second baseline (speedups stay against the
first row, the model in ``--dtype``; the decode summary gives both). Quantized linears run aten's packed
kernels on bf16 activations at decode sizes whatever the model's dtype (`kronc.codegen.ops.quant`), while
512-token perplexity windows of a float32 model dequantize in float32; so the perplexity is also measured
with every quantized linear on the packed kernels ("ppl decode path") to show what decoding computes.

With ``--calib-windows N > 0`` plans are data-aware (input statistics from N windows of the King
James text, calibration only). Measurements repeat ``--reps`` times, interleaved across models so
load changes from other processes hit them alike; medians are reported. Timing runs with
``--threads`` torch threads (default 1: on a small machine shared with other work, OpenMP threads
spin-waiting on each other make multi-threaded timings erratic).

    python benchmarks/speed.py                                   # speed + quality at 4x
    python benchmarks/speed.py --budgets 2x,4x --reps 5 --modes eager,compile

Writes ``benchmarks/results/speed.{md,json}`` (``--out``) and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import kronc
from kronc.plan import Plan
from kronc.policies import Policy

RESULTS = Path(__file__).parent / "results"
SCOPE = {"include": ["model.layers.*"]}
POLICIES: dict[str, dict[str, Any]] = {
    "speed": {"default_formats": [{"kind": "lowrank"}, {"kind": "dense"}]},
    "quality": {},
    "int8": {"budget": {"fp32": "3.9x", "bf16": "1.95x"}, "rules": [{"match": "*", "bits": [8], "group_sizes": ["row"], "formats": [{"kind": "dense"}]}],
             "default_formats": [{"kind": "dense"}]},
    "int4": {"shipped": "int4-kernels"},
    "none": {"budget": {"fp32": "1x", "bf16": "1x"}, "default_formats": [{"kind": "dense"}]},
    "kernels": {"rules": [{"match": "*", "bits": [4, 8], "group_sizes": [32, 64, 128, "row"],
                           "formats": [{"kind": "dense"}, {"kind": "lowrank"}]}],
                "default_formats": [{"kind": "dense"}]},
}
"""``int8``: every decoder linear at int8 with one scale per row (3.99x of fp32, 2x of bf16: its budget is
fixed per model dtype); ``int4``: the shipped ``int4-kernels`` policy (int8 or int4 per site, groups of
32-128) at the budget (ratios are against the model's own dtype: int4 is at most ~3.8x of bf16); ``kernels``: the
same int8/int4 limits with low rank allowed too (int4 alone stops at ~7.5x of fp32, so an 8x budget needs some
low-rank sites); ``none``: every decoder linear kept as it is (with ``--head``: the head's own effect)."""


def policy_for(name: str, budget: str, objective: str, dtype: str = "fp32") -> Policy:
    """The benchmark's policy ``name`` at ``budget`` (a fixed ``budget`` in its entry wins), scoped to the decoder."""
    entry = dict(POLICIES[name])
    if "shipped" in entry:
        from kronc.policies import load_policy

        shipped = load_policy(entry.pop("shipped")).model_dump(mode="json")
        entry = {k: shipped[k] for k in ("rules", "default_formats")}
    budget = entry.pop("budget", budget)
    if isinstance(budget, dict):
        budget = budget[dtype]
    return Policy(budget=budget, scope=SCOPE, objective=objective, **entry)


# ------------------------------------------------------------------------------------------------ measuring


def _rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only: give freed pages back to the OS
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Peak growth of RSS inside a ``with`` block, sampled by a thread."""

    def __init__(self, interval: float = 5e-4) -> None:
        self.interval, self.peak, self.base = interval, 0, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        _trim()
        self.base = self.peak = _rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def weight_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def disk_bytes(model: nn.Module, tokenizer: Any) -> tuple[int, str]:
    """Bytes on disk: `kronc.save` for compressed models, a safetensors state dict for the dense one."""
    with tempfile.TemporaryDirectory() as tmp:
        if getattr(model, "kronc_plan", None) is not None:
            try:
                kronc.save(model, tmp)
                return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()), "kronc.save"
            except Exception as e:  # serialize is someone else's module; fall back rather than fail
                print(f"  kronc.save failed ({type(e).__name__}: {e}); measuring a safetensors state dict")
        from safetensors.torch import save_file

        state, seen = {}, set()
        for k, v in model.state_dict().items():
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                state[k] = v.contiguous()
        save_file(state, str(Path(tmp) / "model.safetensors"))
        return (Path(tmp) / "model.safetensors").stat().st_size, "safetensors"


# ------------------------------------------------------------------------------------------------ models


@dataclass
class Variant:
    name: str
    model: nn.Module
    plan: Plan | None = None
    stages: dict[str, float] = field(default_factory=dict)
    eager_forward: Callable[..., Any] | None = None
    compiled_forward: Callable[..., Any] | None = None
    results: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)

    def use(self, mode: str) -> None:
        """Route ``model.forward`` (what ``generate`` calls) to the eager or the compiled forward."""
        if mode == "compile":
            self.model.forward = self.compiled_forward  # type: ignore[method-assign]
        elif "forward" in self.model.__dict__:
            del self.model.forward

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)


def build_variants(args: argparse.Namespace, model: nn.Module, tokenizer: Any) -> list[Variant]:
    variants = [Variant("dense", model)]
    if args.dense_bf16 and args.dtype != "bf16":
        import copy

        variants.append(Variant("dense bf16", copy.deepcopy(model).to(torch.bfloat16)))
    calibration = None
    if args.calib_windows:
        from kronc.tools.data import kjv_text

        ids = tokenizer(kjv_text(max_chars=400_000), return_tensors="pt").input_ids[0]
        calibration = [ids[i * 512 : (i + 1) * 512][None] for i in range(args.calib_windows)]
    for budget in args.budgets:
        for name in args.policies:
            policy = policy_for(name, budget, "data" if calibration else "weight", args.dtype)
            label = policy.budget if "budget" in POLICIES[name] else budget
            print(f"kronc.compile {name} {label} ...", flush=True)
            small, report = kronc.compile(model, policy=policy, calibration=calibration, report=True)
            kinds = Counter(d.spec.kind for d in report.plan.decisions)
            print(f"  {dict(report.seconds)}  formats {dict(kinds)}", flush=True)
            base = Variant(f"{name} {label}", small.eval(), report.plan, dict(report.seconds))
            variants.append(base)
            variants += [head_variant(base, model, policy, head) for head in args.head]
    return variants


HEAD_PRECISIONS = {"int8": {"dtype": "int8"}, "int4g64": {"dtype": "int4", "group_size": 64},
                   "int4g64-hqq": {"dtype": "int4", "group_size": 64, "fit": "hqq"},
                   "int4g32": {"dtype": "int4", "group_size": 32}, "bf16": {"dtype": "bf16"}}
"""``--head`` choices: the precision of the tied embedding/LM head (a policy ``fixed`` entry, outside the budget)."""


def head_variant(base: Variant, dense_model: nn.Module, policy: Policy, head: str) -> Variant:
    """``base`` (a compressed model and its plan) with the tied embedding/LM head stored at ``head`` by a policy
    ``fixed`` entry (outside the budget). The fixed site does not enter the budget's solve, so the decoder's
    decisions are the base plan's (tests/test_fixed_head.py checks it): rather than planning and fitting
    the 210 decoder linears again, the head's decision is added to the base plan (`kronc.planning.fixed`,
    as `kronc.compile` does) and only the head is fitted and swapped into a copy of the base model."""
    import copy

    from kronc.passes.swap import swap_modules
    from kronc.planning import fit_site
    from kronc.planning.fixed import fixed_decisions, with_fixed
    from kronc.policies import resolve

    t = time.perf_counter()
    fixed = Policy.model_validate({**policy.model_dump(mode="json"),
                                   "fixed": [{"match": "lm_head", "precision": HEAD_PRECISIONS[head], "name": "head"}]})
    model = copy.deepcopy(base.model)
    sites = kronc.capture(dense_model).sites
    entries = {r.site.name: (r.fixed, r.rule or "fixed") for r in resolve(fixed, sites).sites if r.fixed is not None}
    chosen = [s for s in sites if s.name in entries]
    dense = {s.name: dense_model.get_parameter(s.name).detach() for s in chosen}
    decisions = fixed_decisions(chosen, dense, entries)
    assert base.plan is not None
    plan = with_fixed(base.plan, decisions, [s.name for s in sites])
    swap_modules(model, chosen, {d.site: fit_site(dense[d.site], d.spec) for d in decisions})
    model.kronc_plan = plan  # type: ignore[assignment]
    seconds = {"apply": time.perf_counter() - t}
    print(f"  head {head}: {[d.values for d in decisions]} in {seconds['apply']:.1f}s; total ratio {plan.total_ratio:.2f}x",
          flush=True)
    return Variant(f"{base.name} + head {head}", model.eval(), plan, {**base.stages, **seconds})


@contextlib.contextmanager
def packed_kernels_everywhere() -> Any:
    """Quantized linears take the packed bf16 kernels at any token count (what decode runs), for a perplexity check."""
    from kronc.codegen.ops import quant

    saved = quant.DECODE_MAX_TOKENS, quant.PACKED_MAX_TOKENS
    quant.DECODE_MAX_TOKENS = quant.PACKED_MAX_TOKENS = 1 << 30
    try:
        yield
    finally:
        quant.DECODE_MAX_TOKENS, quant.PACKED_MAX_TOKENS = saved


# ------------------------------------------------------------------------------------------------ timing


@torch.no_grad()
def prefill_seconds(model: nn.Module, ids: Tensor) -> float:
    t = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t


@torch.no_grad()
def generate_seconds(model: nn.Module, prompt: Tensor, new: int) -> float:
    t = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True)
    elapsed = time.perf_counter() - t
    assert out.shape[1] == prompt.shape[1] + new
    return elapsed


def measure_round(v: Variant, mode: str, prefill_ids: Tensor, prompt: Tensor, new: int) -> None:
    v.use(mode)
    v.add(f"{mode} prefill s", prefill_seconds(v.model, prefill_ids))
    one = generate_seconds(v.model, prompt, 1)
    many = generate_seconds(v.model, prompt, new + 1)
    v.add(f"{mode} decode tok/s", new / max(many - one, 1e-9))
    v.use("eager")


def warm_up(v: Variant, mode: str, prefill_ids: Tensor, prompt: Tensor) -> float:
    """Run every shape once; returns the seconds it took (the compile time under torch.compile)."""
    if mode == "compile" and v.compiled_forward is None:
        v.eager_forward = v.model.forward
        v.compiled_forward = torch.compile(v.eager_forward)
    v.use(mode)
    t = time.perf_counter()
    try:
        prefill_seconds(v.model, prefill_ids)
        generate_seconds(v.model, prompt, 4)
    finally:
        v.use("eager")
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------------------ report


def _load(avg: Any) -> str:
    return "-" if not avg else "/".join(f"{x:.1f}" for x in avg)


def _median(xs: list[float] | None) -> float | None:
    return statistics.median(xs) if xs else None


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def linear_flops(v: Variant) -> float:
    """Decoder-linear FLOPs per token relative to dense (from the plan's specs)."""
    if v.plan is None:
        return 1.0
    decisions = [d for d in v.plan.decisions if d.budgeted]  # the decoder linears (a fixed head is not one)
    before = sum(2 * d.shape[0] * d.shape[1] for d in decisions)
    after = sum(d.spec.flops_per_token(tuple(d.shape)) for d in decisions)  # type: ignore[arg-type]
    return after / before


def summarize(variants: list[Variant], modes: list[str], head_bytes: int = 0) -> list[dict[str, Any]]:
    """One row per variant; ``head_bytes``: dense bytes of the tied embedding/LM head (for the ratio with it)."""
    rows = []
    for v in variants:
        row: dict[str, Any] = {"variant": v.name, **v.results}
        for key, xs in v.samples.items():
            row[key] = _median(xs)
            row[f"{key} samples"] = xs
        if v.plan is not None:
            row["plan ratio"] = v.plan.ratio
            fixed = [d for d in v.plan.decisions if not d.budgeted]
            if fixed:  # decoder + head: the head at its fixed precision (outside the budget)
                row["total ratio"] = v.plan.total_ratio
            else:  # decoder + head: the head kept dense
                row["total ratio"] = (v.plan.bytes_before + head_bytes) / (v.plan.bytes_after + head_bytes)
            row["head"] = next((d.values for d in v.plan.decisions if not d.budgeted), None)
            row["scope MB before"], row["scope MB after"] = v.plan.bytes_before / 1e6, v.plan.bytes_after / 1e6
            row["formats"] = dict(Counter(d.spec.kind for d in v.plan.decisions if d.budgeted))
            row["precisions"] = dict(Counter(d.spec.describe() for d in v.plan.decisions if d.budgeted))
            row["kronc.compile s"] = v.stages
        row["linear flops x"] = linear_flops(v)
        rows.append(row)
    dense = rows[0]
    for row in rows:
        for mode in modes:
            p, d = row.get(f"{mode} prefill s"), row.get(f"{mode} decode tok/s")
            if p and dense.get(f"{mode} prefill s"):
                row[f"{mode} prefill speedup"] = dense[f"{mode} prefill s"] / p
            if d and dense.get(f"{mode} decode tok/s"):
                row[f"{mode} decode speedup"] = d / dense[f"{mode} decode tok/s"]
        for key in ("weights MB", "peak MB", "disk MB"):
            if row.get(key) and dense.get(key):
                row[f"{key} x"] = row[key] / dense[key]
    return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, env: dict[str, Any]) -> str:
    lines = [
        "# Speed, memory and size: SmolLM2-135M, dense vs kronc-compressed",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {env['cpu']}, {env['cores']} cores (shared with other work), torch {env['torch']}, "
        f"{args.threads} torch thread(s), model in {getattr(args, 'dtype', 'fp32')}, load average (1/5/15 min) "
        f"{_load(env.get('load average before'))} before and {_load(env.get('load average'))} after the timings. "
        f"Medians of {args.reps} interleaved repetitions. Prefill: "
        f"{args.prefill} tokens, batch 1. Decode: greedy generate with KV cache from a {args.prompt}-token "
        f"prompt, {args.new_tokens} new tokens. Speedups and ratios are against the dense model in the same run. "
        f"Perplexity: ABC news, {args.ppl_windows} windows of 512 tokens. "
        + (f"Data-aware plans from {args.calib_windows} King James windows of 512 tokens." if args.calib_windows
           else "Weight-objective plans."),
        "",
    ]
    head = ["model", "formats", "ratio: decoder (with head)", "lin. FLOPs"]
    for mode in args.modes:
        head += [f"{mode} prefill s (speedup)", f"{mode} decode tok/s (speedup)"]
    head += ["weights MB (x)", "peak MB (x)", "disk MB (x)", "ppl"]
    if any(r.get("ppl decode path") for r in rows):
        head.append("ppl decode path")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        formats = ", ".join(f"{k} {n}" for k, n in sorted(r.get("formats", {}).items())) or "dense"
        if any("@int" in k for k in r.get("precisions", {})):  # quantized plans: bits per site
            short = Counter[str]()
            for k, n in r["precisions"].items():
                short[k.removeprefix("dense@").split("-")[0].split("(")[0]] += n
            formats = ", ".join(f"{k} {n}" for k, n in short.most_common())
        if r.get("head"):
            formats += f"; head {r['head']}"
        ratio = "-" if not r.get("plan ratio") else f"{r['plan ratio']:.2f}x ({r.get('total ratio') or r['plan ratio']:.2f}x)"
        cells = [r["variant"], formats, ratio, _fmt(r.get("linear flops x"), ".2f") + "x"]
        for mode in args.modes:
            cells.append(f"{_fmt(r.get(f'{mode} prefill s'), '.3f')} ({_fmt(r.get(f'{mode} prefill speedup'), '.2f')}x)")
            cells.append(f"{_fmt(r.get(f'{mode} decode tok/s'), '.1f')} ({_fmt(r.get(f'{mode} decode speedup'), '.2f')}x)")
        for key in ("weights MB", "peak MB", "disk MB"):
            cells.append(f"{_fmt(r.get(key), '.0f')} ({_fmt(r.get(key + ' x'), '.2f')})")
        cells.append(_fmt(r.get("ppl"), ".2f"))
        if "ppl decode path" in head:
            cells.append(_fmt(r.get("ppl decode path"), ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "`kronc.compile` time by stage (seconds; apply = fit the formats + rewrite), and torch.compile "
              "warm-up (first prefill + first generate, i.e. compile time):", "",
              "| model | capture | plan | apply | total | torch.compile warm-up s |", "|---|---|---|---|---|---|"]
    for r in rows:
        s = r.get("kronc.compile s", {})
        lines.append(f"| {r['variant']} | " + " | ".join(_fmt(s.get(k), ".1f") for k in ("capture", "plan", "apply", "total"))
                     + f" | {_fmt(r.get('compile warm-up s'), '.0f')} |")
    lines += ["", "lin. FLOPs: FLOPs per token of the decoder linears relative to dense (the LM head, 21% of a dense "
              "token's linear FLOPs, and attention are not included). Peak MB: weights + peak RSS growth during one "
              "eager 512-token prefill. torch.compile warm-up times include hits in inductor's on-disk cache when "
              "the same graphs were compiled by an earlier run.", ""]
    lines += decode_baselines(rows, args.modes)
    for mode in args.modes:
        lines += decode_model(rows, mode)
    if any(set(r.get("formats", {})) & {"doped", "blocksparse"} for r in rows):
        lines += [
            "Doped and block-sparse sites run as gather/scatter code on CPU (a sparse overlay gathers a tokens x "
            "nonzeros product and scatter-adds it into the output; block-sparse gathers input blocks, runs a batched "
            "GEMM of small blocks and scatter-adds the results), which costs far more per FLOP than the dense GEMM it "
            "replaces, and inductor compiles these ops into generic loops. Plans that use them are smaller but not "
            "faster on CPU; low rank (two dense GEMMs through a thin intermediate) is the format whose time follows "
            "its FLOPs and bytes. The `speed` policy therefore allows only low rank.",
            "",
        ]
    return "\n".join(lines)


def decode_baselines(rows: list[dict[str, Any]], modes: list[str]) -> list[str]:
    """Decode tok/s of every compressed model against each dense baseline (fp32 and bf16), mode by mode."""
    dense = [r for r in rows if r["variant"].startswith("dense")]
    if len(dense) < 2:
        return []
    head = ["model", *[f"{m} decode vs {d['variant']}" for m in modes for d in dense]]
    lines = ["Decode speedup against each dense baseline (same run, tok/s ratios of medians):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"]]
        for m in modes:
            for d in dense:
                a, b = r.get(f"{m} decode tok/s"), d.get(f"{m} decode tok/s")
                cells.append(f"{a / b:.2f}x" if a and b else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def decode_model(rows: list[dict[str, Any]], mode: str) -> list[str]:
    """Fit decode time per token = overhead + cost per MB of weights over the dense and low-rank-only models,
    and say what bounds the decode speedup."""
    key = f"{mode} decode tok/s"
    points = [(r["weights MB"], 1000 / r[key]) for r in rows if r.get(key) and r["variant"] != "dense bf16"
              and set(r.get("formats", {"dense": 1})) <= {"dense", "lowrank"}
              and not any("@int" in f for f in r.get("precisions", {}))]
    compressed = [r for r in rows if r.get("plan ratio")]
    if len(points) < 2 or not compressed:
        return []
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return []
    k = sum((x - mx) * (y - my) for x, y in points) / sxx
    overhead = my - k * mx
    dense_mb, dense_ms = rows[0]["weights MB"], 1000 / rows[0][key]
    r = compressed[0]
    scope = r.get("scope MB before") or (dense_mb - r["weights MB"]) / (1 - 1 / r["plan ratio"])
    rest = dense_mb - scope
    bound = dense_ms / (overhead + k * rest)
    need = (dense_ms / 2 - overhead) / k  # weights MB for a 2x decode speedup
    if need > rest:
        reach = f"a 2x decode speedup needs at most {need:.0f} MB of weights per token: the decoder linears at " \
                f"{scope / (need - rest):.1f}x"
    else:
        reach = "2x is out of reach without compressing the LM head or cutting the per-token overhead"
    if mode == "eager":
        reach += (" (in eager each low-rank linear is a custom op running two GEMMs, so per-call dispatch adds to the "
                  "fixed part)")
    return [
        f"Decode ({mode}), dense and low-rank models: time per token ~= {overhead:.1f} ms + {k * 1000:.0f} us per MB of "
        f"weights read (least squares over {n} models; dense {dense_ms:.1f} ms). Decode at batch 1 streams every weight "
        f"once per token, so it follows bytes, not FLOPs. The LM head and embedding ({rest:.0f} MB, tied, outside the "
        f"budget) and the per-token work that does not shrink (attention, norms, generate's own Python) bound the "
        f"decode speedup to {bound:.2f}x even with the decoder linears compressed to nothing; {reach}.",
        "",
    ]


# ------------------------------------------------------------------------------------------------ main


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="4x", help="comma-separated budgets for the decoder linears")
    ap.add_argument("--policies", default="speed,quality", help=f"comma-separated, from {list(POLICIES)}")
    ap.add_argument("--modes", default="eager,compile", help="eager and/or compile (torch.compile, inductor)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="the model's dtype (activations and kept weights); the packed int8/int4 CPU kernels run only for bf16")
    ap.add_argument("--dense-bf16", action="store_true", help="also time the dense model cast to bfloat16")
    ap.add_argument("--calib-windows", type=int, default=0, help="King James windows for data-aware plans (0: weight)")
    ap.add_argument("--ppl-windows", type=int, default=2, help="ABC news windows for the perplexity check (0: skip)")
    ap.add_argument("--head", default="", help=f"comma-separated precisions of the tied embedding/LM head, from "
                    f"{list(HEAD_PRECISIONS)}: one more variant per compressed model (policy `fixed`, outside the budget)")
    ap.add_argument("--out", type=Path, default=RESULTS / "speed")
    ap.add_argument("--render", type=Path, help="only rewrite the markdown from a JSON this script wrote")
    args = ap.parse_args()
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        ns = argparse.Namespace(**{**saved["args"], "out": Path(saved["args"]["out"])})
        table = markdown(saved["rows"], ns, saved["command"], saved["env"])
        ns.out.with_suffix(".md").write_text(table)
        print(table)
        return
    args.budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.head = [h.strip() for h in args.head.split(",") if h.strip()]
    unknown = [p for p in args.policies if p not in POLICIES] + [m for m in args.modes if m not in ("eager", "compile")]
    unknown += [h for h in args.head if h not in HEAD_PRECISIONS]
    if unknown:
        ap.error(f"unknown policies or modes: {unknown}")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0].replace(str(Path.cwd()) + "/", ""), *sys.argv[1:]])

    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # every variant compiles the same forward code object
    torch._dynamo.config.accumulated_recompile_limit = 1024
    from kronc.tools.data import abc_news_text
    from kronc.tools.evaluate import perplexity
    from kronc.tools.zoo import load_smollm2

    model, tokenizer = load_smollm2()
    model.eval()
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    text_ids = tokenizer(abc_news_text(), return_tensors="pt").input_ids
    prefill_ids, prompt = text_ids[:, : args.prefill], text_ids[:, 1000 : 1000 + args.prompt]
    variants = build_variants(args, model, tokenizer)

    for v in variants:  # sizes, memory and quality (eager)
        v.results["weights MB"] = weight_bytes(v.model) / 1e6
        disk, how = disk_bytes(v.model, tokenizer)
        v.results["disk MB"], v.results["disk via"] = disk / 1e6, how
        prefill_seconds(v.model, prefill_ids)  # first call allocates caches; not counted
        with PeakRSS() as peak:
            prefill_seconds(v.model, prefill_ids)
        v.results["prefill RSS growth MB"] = peak.growth / 1e6
        v.results["peak MB"] = v.results["weights MB"] + peak.growth / 1e6
        if args.ppl_windows:
            v.results["ppl"] = perplexity(v.model, tokenizer, abc_news_text(), window=512, max_windows=args.ppl_windows,
                                          progress=False).ppl
            if v.plan is not None and any(d.spec.describe().startswith("dense@int") for d in v.plan.decisions):
                with packed_kernels_everywhere():
                    v.results["ppl decode path"] = perplexity(v.model, tokenizer, abc_news_text(), window=512,
                                                              max_windows=args.ppl_windows, progress=False).ppl
        print(f"{v.name}: {v.results}", flush=True)

    load_before = os.getloadavg()
    for mode in args.modes:
        for v in variants:
            try:
                seconds = warm_up(v, mode, prefill_ids, prompt)
            except Exception as e:
                v.results[f"{mode} error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                print(f"{v.name} {mode}: FAILED {v.results[f'{mode} error']}", flush=True)
                continue
            if mode == "compile":
                v.results["compile warm-up s"] = seconds
            print(f"{v.name} {mode}: warm-up {seconds:.1f}s", flush=True)
    for rep in range(args.reps):
        for mode in args.modes:
            for v in variants:
                if f"{mode} error" not in v.results:
                    measure_round(v, mode, prefill_ids, prompt, args.new_tokens)
        print(f"round {rep + 1}/{args.reps}: " + "; ".join(
            f"{v.name} " + ", ".join(f"{k} {xs[-1]:.3g}" for k, xs in v.samples.items()) for v in variants), flush=True)

    emb = model.get_input_embeddings().weight
    rows = summarize(variants, args.modes, emb.numel() * emb.element_size())
    env = {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
           "threads": args.threads, "load average before": load_before, "load average": os.getloadavg()}
    table = markdown(rows, args, command, env)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table)
    report = {"command": command, "env": env, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    print(table)
    print(f"wrote {args.out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
