"""Per-rank memory of end-to-end recovery with the student sharded by FSDP2 (``shard=True``) against
data-parallel (every rank holds the whole student), two gloo ranks.

Run under torchrun, one launch per model and mode (each in fresh processes, so peaks do not mix)::

    torchrun --nproc_per_node 2 benchmarks/shard_recovery.py --model toy --mode shard --threads 1
    torchrun --nproc_per_node 2 benchmarks/shard_recovery.py --model toy --mode replicated --threads 1
    torchrun --nproc_per_node 2 benchmarks/shard_recovery.py --model smollm2 --mode shard --threads 1

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


def _models(name: str) -> tuple[Any, Any, Any]:
    """Teacher, compressed student and training token ids."""
    import torch

    import kronc

    if name == "toy":
        from kronc.tools.toy import tiny_llama

        torch.manual_seed(0)
        teacher = tiny_llama(layers=8, width=256)
        student = kronc.compile(teacher, budget="3x", progress=False)
        vocab = 128
    else:
        from kronc.tools.zoo import load_smollm2

        teacher, _ = load_smollm2()
        policy = {"budget": "2x", "default_formats": [{"kind": "dense", "precisions": [{"dtype": "bf16"}]}]}
        student = kronc.compile(teacher, policy=policy, progress=False)
        vocab = teacher.config.vocab_size
    ids = torch.randint(0, vocab, (20000,), generator=torch.Generator().manual_seed(1))
    return teacher, student, ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("toy", "smollm2"), default="toy")
    p.add_argument("--mode", choices=("shard", "replicated"), required=True)
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

    dist.init_from_env()
    teacher, student, ids = _models(args.model)
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
    whole = sum(t.numel() * t.element_size() for t in (*student.parameters(), *student.buffers()))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset this process's peak resident memory to its current resident memory
    start, t0 = _vm("VmRSS"), time.perf_counter()
    result = kronc.recover(student, teacher, ids, steps=args.steps, seq_len=64, batch_size=4, hidden=0.0, lr=1e-4,
                           progress=False, shard=args.mode == "shard")
    row = {"rank": dist.rank(), "rss_before": start, "peak_rss": _vm("VmHWM"), "seconds": time.perf_counter() - t0,
           "student_params_and_buffers": whole, "held_params": held[-1][0], "held_adamw": held[-1][1],
           "loss": [round(r.loss, 6) for r in result.history]}
    rows = dist.gather_list(row)
    if dist.rank() == 0:
        print(json.dumps({"model": args.model, "mode": args.mode, "world": dist.world(), "threads": args.threads,
                          "ranks": rows}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
