"""Per-rank memory of end-to-end recovery with the student sharded by FSDP2 (``shard=True``) against
data-parallel (every rank holds the whole student), two gloo ranks.

Run under torchrun, one launch per model and mode (each in fresh processes, so peaks do not mix)::

    torchrun --nproc_per_node 2 benchmarks/shard_recovery.py --model toy --mode shard --threads 1
    torchrun --nproc_per_node 2 benchmarks/shard_recovery.py --model toy --mode replicated --threads 1
    torchrun --nproc_per_node 2 benchmarks/shard_recovery.py --model smollm2 --mode shard --threads 1

Starting from a save folder (``--save``: written once by ``--prepare``, one process), ``--mode shard`` loads the
student whole (``kronc.load``) and recovers it sharded, ``--mode from_save`` hands `kronc.recover` the folder
(`kronc.recover.from_save`: built on meta, each rank reads its shards, the result written block by block to
``--out``); both reset the peak after building the teacher, so the peak includes loading the student::

    python benchmarks/shard_recovery.py --model smollm2 --prepare /tmp/smol-bf16 --threads 1
    torchrun --nproc_per_node 2 benchmarks/shard_recovery.py --model smollm2 --save /tmp/smol-bf16 --mode shard
    torchrun --nproc_per_node 2 benchmarks/shard_recovery.py --model smollm2 --save /tmp/smol-bf16 --mode from_save \
        --out /tmp/smol-bf16-recovered

Each rank builds the teacher and the compressed student (``kronc.compile``; both ranks get the same), then
resets its peak resident memory (Linux ``/proc/self/clear_refs``), runs `kronc.recover` and reads the peak
back (``VmHWM``): the peak *during recovery*, teacher and the whole student it starts from included. An
optimizer hook measures what the rank holds at every step: its parameters (local shards when sharded) and
AdamW state. Rank 0 prints one JSON line with every rank's numbers.

Models: ``toy`` is kronc's tiny Llama made wider (8 blocks of width 256, budget 3x: int8 and bf16 dense);
``smollm2`` is SmolLM2-135M from ``~/.cache/kronc/smollm2-135m`` compressed to bf16 (every site dense bf16,
so the trained values are parameters; quantized codes are buffers, which FSDP2 does not shard).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any


def _vm(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _teacher(name: str) -> Any:
    import torch

    if name == "toy":
        from kronc.tools.toy import tiny_llama

        torch.manual_seed(0)
        return tiny_llama(layers=8, width=256)
    from kronc.tools.zoo import load_smollm2

    return load_smollm2()[0]


def _student(name: str, teacher: Any) -> Any:
    import kronc

    if name == "toy":
        return kronc.compile(teacher, budget="3x", progress=False)
    policy = {"budget": "2x", "default_formats": [{"kind": "dense", "precisions": [{"dtype": "bf16"}]}]}
    return kronc.compile(teacher, policy=policy, progress=False)


def _ids(teacher: Any) -> Any:
    import torch

    vocab = getattr(getattr(teacher, "config", None), "vocab_size", 128)
    return torch.randint(0, vocab, (20000,), generator=torch.Generator().manual_seed(1))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset this process's peak resident memory to its current resident memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("toy", "smollm2"), default="toy")
    p.add_argument("--mode", choices=("shard", "replicated", "from_save"))
    p.add_argument("--prepare", help="compress the student and save it to this folder (one process), then stop")
    p.add_argument("--save", help="start from this save folder (written by --prepare)")
    p.add_argument("--out", help="--mode from_save: the folder the recovered student is written to")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import torch

    torch.set_num_threads(args.threads)
    import kronc
    from kronc.recover import loop
    from kronc.recover.sharding import local_bytes
    from kronc.scale import distributed as dist

    if args.prepare:
        kronc.save(_student(args.model, _teacher(args.model)), args.prepare, overwrite=True)
        return
    dist.init_from_env()
    teacher = _teacher(args.model)
    ids = _ids(teacher)
    if args.save is None:
        student = _student(args.model, teacher)
        _reset_peak()
    else:
        _reset_peak()  # from here on: loading the student (whole, or only this rank's shards) counts
        student = kronc.load(args.save) if args.mode != "from_save" else args.save
    loaded = {"peak_rss_loaded": _vm("VmHWM")}  # the student whole on this rank (from_save: replaced after the fill)
    if args.mode == "from_save":
        from kronc.recover import from_save

        fill = from_save.fill

        def fill_spy(model: Any, saved: Any) -> None:
            fill(model, saved)
            loaded["peak_rss_loaded"] = _vm("VmHWM")  # built on meta, sharded, this rank's shards read

        from_save.fill = fill_spy  # type: ignore[assignment]
    held: list[tuple[int, int]] = []
    make = loop.make_optimizer

    def spy(model: Any, params: Any, cfg: Any) -> Any:
        from torch.distributed.tensor import DTensor

        def state(o: Any) -> int:
            local = [t.to_local() if isinstance(t, DTensor) else t for s in o.state.values() for t in s.values()]
            return sum(t.numel() * t.element_size() for t in local if t.dim())

        opt = make(model, params, cfg)
        opt.register_step_post_hook(lambda o, *_: held.append((local_bytes(model), state(o))))
        return opt

    loop.make_optimizer = spy  # type: ignore[assignment]
    whole = sum(t.numel() * t.element_size() for t in (*student.parameters(), *student.buffers())) \
        if not isinstance(student, str) else None
    start, t0 = _vm("VmRSS"), time.perf_counter()
    result = kronc.recover(student, teacher, ids, steps=args.steps, seq_len=64, batch_size=4, hidden=0.0, lr=1e-4,
                           progress=False, shard=args.mode != "replicated", out=args.out)
    row = {"rank": dist.rank(), "rss_before": start, "peak_rss": _vm("VmHWM"), "seconds": time.perf_counter() - t0,
           "student_params_and_buffers": whole, "held_params": held[-1][0], "held_adamw": held[-1][1],
           "loss": [round(r.loss, 6) for r in result.history], **loaded}
    rows = dist.gather_list(row)
    if dist.rank() == 0:
        print(json.dumps({"model": args.model, "mode": args.mode, "save": args.save, "world": dist.world(), "threads": args.threads,
                          "ranks": rows}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
