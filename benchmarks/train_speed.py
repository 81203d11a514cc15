"""Recovery training speed on SmolLM2-135M: tokens per second of one block-wise step and one end-to-end step.

    python benchmarks/train_speed.py --threads 1                    # this tree's training path
    python benchmarks/train_speed.py --threads 1 --mode never        # the factored ops only (main's path)
    python benchmarks/train_speed.py --threads 1 --profile block    # cProfile of the block steps

The student is SmolLM2-135M at about 10x with every format in it: the decoder layers take turns by
index (layer mod 4): a Kronecker sum, a doped Kronecker (Kronecker base + a 0.5% overlay), block-sparse,
and low rank, each as the uniform plan of that format at ``--budget`` (`kronc.planning.uniform_plan`).
A **block step** is one AdamW step of block-wise reconstruction on decoder layer ``--layer`` (the
block's own inputs cached first, its compressed factors, norms and biases trained on the relative
squared error against the dense layer's output: what `kronc.recover.blockwise` does per step); an
**end-to-end step** is one `kronc.recover` distillation step (logit KL + hidden-state distillation,
teacher forward included, factors + norms + biases trained). Both on ``--batch`` windows of
``--seq-len`` King James tokens. ``--mode never`` turns off the dense training path
(`kronc.formats.training`): the factored ops only, what main's code ran. Writes ``--json`` when given.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path
from typing import Any

import torch

import kronc
from kronc.formats import DopedSpec
from kronc.plan import Plan
from kronc.planning import uniform_plan
from kronc.policies import Policy, resolve
from kronc.recover.losses import relative_mse
from kronc.tools.data import kjv_text
from kronc.tools.zoo import load_smollm2

FORMATS = ("kronecker", "doped", "blocksparse", "lowrank")


def mixed_plan(cap: kronc.Captured, budget: str) -> Plan:
    """Layer ``i``'s linears in format ``FORMATS[i % 4]`` (doped: the Kronecker plan's base + 0.5% overlay)."""
    res = resolve(Policy(budget=budget), cap.sites, warn=False)
    sites = [s for s in cap.sites if res[s.name].in_scope and ".layers." in s.name]
    weights = {s.name: cap.weight(s) for s in sites}
    decisions = []
    for k, fmt in enumerate(FORMATS):
        mine = [s for s in sites if int(s.name.split(".layers.")[1].split(".")[0]) % 4 == k]
        plan = uniform_plan(mine, weights, "kronecker" if fmt == "doped" else fmt, budget)
        for d in plan.decisions:
            if fmt == "doped":
                spec = DopedSpec(base=d.spec, density=0.005)
                d = d.model_copy(update={"spec": spec, "bytes_after": spec.nbytes(d.shape, 4)})
            decisions.append(d)
    return Plan(decisions=decisions, budget=budget)


def block_inputs(model: torch.nn.Module, layer: int, ids: torch.Tensor) -> tuple[tuple, dict]:
    """The inputs decoder layer ``layer`` of ``model`` sees on ``ids`` (hidden states, masks, positions)."""
    seen: list[tuple[tuple, dict]] = []

    def hook(m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                     {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}))

    h = model.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(ids, use_cache=False)
    h.remove()
    return seen[0]


def block_speed(student: torch.nn.Module, teacher: torch.nn.Module, layer: int, ids: torch.Tensor,
                steps: int, profile: bool) -> float:
    """Tokens per second of AdamW steps on one compressed decoder layer against the dense one."""
    args, kwargs = block_inputs(student, layer, ids)
    block, dense = student.model.layers[layer], teacher.model.layers[layer]
    with torch.no_grad():
        target = dense(*args, **kwargs)
        target = target[0] if isinstance(target, tuple) else target
    params = [p for p in block.parameters() if p.is_floating_point()]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = block(*args, **kwargs)
        loss = relative_mse(out[0] if isinstance(out, tuple) else out, target, None)
        loss.backward()
        opt.step()

    step()  # warm-up
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
    return ids.numel() * steps / seconds


def e2e_speed(student: torch.nn.Module, teacher: torch.nn.Module, train: torch.Tensor, args: argparse.Namespace,
              profile: bool) -> float:
    """Tokens per second of `kronc.recover` distillation steps (the first, warm-up step not counted)."""
    recipe = {"batch_size": args.batch, "seq_len": args.seq_len, "kd": 1.0, "hidden": 1.0, "lm": 0.0,
              "temperature": 2.0, "trainable": "factors+norms+biases", "lr": 1e-5, "schedule": "constant",
              "warmup": 0.0, "checkpoint_every": 1_000_000, "progress": False}
    kronc.recover(student, teacher, train, steps=1, **recipe)
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    result = kronc.recover(student, teacher, train, steps=args.e2e_steps, **recipe)
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
    return result.tokens / result.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="10x")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--layer", type=int, default=None, help="block to time (default: one of each format)")
    ap.add_argument("--block-steps", type=int, default=4)
    ap.add_argument("--e2e-steps", type=int, default=3)
    ap.add_argument("--mode", choices=["auto", "never", "always"], default="auto",
                    help="training path: auto (cheaper of factored and dense), never (factored only: main's path), "
                    "always (dense whenever training)")
    ap.add_argument("--student", default=None, help="pickle of the compressed student: loaded if there, else written")
    ap.add_argument("--profile", choices=["block", "e2e"], default=None)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--json", default=None, help="write the measurements here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        from kronc.formats.training import set_dense_training
    except ImportError:  # main's tree has no kronc.formats.training: it runs the factored ops only
        if args.mode != "never":
            raise
    else:
        set_dense_training(args.mode)

    model, tok = load_smollm2()
    ids = tok(kjv_text(max_chars=400_000), return_tensors="pt", add_special_tokens=False).input_ids[0]
    cap = kronc.capture(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    if args.student and Path(args.student).is_file():
        student = torch.load(args.student, weights_only=False)
    else:
        t = time.perf_counter()
        plan = mixed_plan(cap, args.budget)
        student = kronc.apply(cap, plan)
        print(f"plan {plan.ratio:.2f}x of the decoder linears, compressed in {time.perf_counter() - t:.0f} s", flush=True)
        if args.student:
            torch.save(student, args.student)
    batch = ids[: args.batch * args.seq_len].reshape(args.batch, args.seq_len)
    out: dict[str, Any] = {"budget": args.budget, "threads": args.threads, "batch": args.batch,
                           "seq_len": args.seq_len, "mode": args.mode, "block": {}}
    layers = [args.layer] if args.layer is not None else list(range(len(FORMATS)))
    for layer in layers:
        tps = block_speed(student, model, layer, batch, args.block_steps, args.profile == "block")
        out["block"][FORMATS[layer % 4]] = tps
        print(f"block step, layer {layer} ({FORMATS[layer % 4]}): {tps:,.0f} tokens/s", flush=True)
    if not args.skip_e2e:
        out["e2e"] = e2e_speed(student, model, ids, args, args.profile == "e2e")
        print(f"end-to-end step: {out['e2e']:,.0f} tokens/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
