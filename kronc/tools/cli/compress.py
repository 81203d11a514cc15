"""``kronc compress``: compress MODEL under a budget or policy (optionally recover it) and save it."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

import kronc

from ...recover import RecoveryConfig, recover
from ...recover.batches import make_batches
from ...scale import distributed as scale_dist
from ...tokens import token_ids
from ..data import kjv_text
from ..evaluate import encode_chars
from ..report import size
from ..resolve_model import ByteTokenizer, folder_tokenizer, vocab_size
from .args import EXIT_OK, UsageError, budget_args, calibration_args, model_arg, quiet_arg, recover_args
from .inputs import calibration_batches, data_aware, policy_and_budget, read_text, resolve_spec

HELP = "compress MODEL under a budget or policy and save it to --out"


def configure(p: argparse.ArgumentParser) -> None:
    model_arg(p)
    budget_args(p)
    p.add_argument("--out", "-o", required=True, type=Path, metavar="DIR", help="folder to save the compressed model in")
    p.add_argument("--output", choices=("auto", "module", "graph"), default="auto",
                   help="module: same class with compressed modules (keeps generate()); graph: rewritten fx graph")
    calibration_args(p)
    recover_args(p)
    p.add_argument("--stream", action="store_true",
                   help="MODEL is a Hugging Face folder larger than memory: compress it one block at a time from its "
                        "safetensors shards (same plan and weights; under torchrun the ranks split the work)")
    p.add_argument("--max-memory", metavar="SIZE", help="with --stream: refuse to start when the estimated peak memory "
                                                       "exceeds SIZE (e.g. 2GB)")
    p.add_argument("--offload-activations", type=Path, metavar="DIR",
                   help="with --stream: keep cached calibration activations in DIR instead of memory")
    quiet_arg(p)


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "kronc.json").is_file())):
        raise UsageError(f"{out} exists and is not an empty folder or a kronc save",
                         "pick a new --out folder (an earlier 'kronc compress' folder is overwritten)")
    check_writable(out)
    policy, budget = policy_and_budget(args)
    if args.stream:
        return _run_streamed(args, out, policy, budget)
    if args.max_memory or args.offload_activations:
        raise UsageError("--max-memory and --offload-activations apply to --stream only")
    if (args.recover_steps or args.recover_seconds or args.recover_method or args.recover_shard) and not args.recover_text:
        raise UsageError("--recover-steps, --recover-seconds, --recover-method and --recover-shard need --recover-text "
                         "FILE (the text to distil on)")
    if not args.recover_text:
        return _compress(args, out, policy, budget)
    with scale_dist.joined_from_env():  # under torchrun: the ranks recover together
        return _compress(args, out, policy, budget)


def _compress(args: argparse.Namespace, out: Path, policy: Any, budget: str | None) -> int:
    """In memory: every rank compresses the same model (deterministic); they recover together; rank 0 saves."""
    recipe = _recovery_recipe(args, policy)
    if recipe is not None and recipe.shard and not scale_dist.active():
        raise UsageError("--recover-shard (or the recipe's shard: true) shards the student over torchrun's ranks",
                         "launch with torchrun --nproc_per_node N -m kronc compress ...")
    resolved = resolve_spec(args.model, for_compression=True)
    calibration = calibration_batches(args, resolved)
    if calibration is not None:
        policy = data_aware(policy, budget)
    recovery = _recovery_data(args, resolved, recipe)  # read and checked before compressing
    t = time.perf_counter()
    small, report = kronc.compile(resolved.model, budget, policy=policy, example_inputs=resolved.example_inputs,
                                  calibration=calibration, output=args.output, report=True,
                                  progress=not args.quiet and scale_dist.rank() == 0)
    seconds = time.perf_counter() - t
    recovered = _recover(args, resolved, small, *recovery) if recovery is not None else None
    if scale_dist.rank() != 0:
        return EXIT_OK
    source = resolved.spec if resolved.kind in ("toy", "factory", "builtin") else None
    kronc.save(small, out, tokenizer=resolved.tokenizer, source=source, example_inputs=resolved.example_inputs)
    plan = report.plan
    print(plan.table())
    print()
    stored = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"in-scope weights {size(plan.bytes_before)} -> {size(plan.bytes_after)} ({plan.ratio:.2f}x); "
          f"output {report.output}; compressed in {seconds:.1f}s")
    if recovered is not None:
        print(recovered)
    how = f"kronc.load({str(out)!r}, model={resolved.spec!r})" if resolved.kind == "factory" else f"kronc.load({str(out)!r})"
    print(f"saved to {out} ({size(stored)} of tensors); load with {how}")
    return EXIT_OK


def _run_streamed(args: argparse.Namespace, out: Path, policy: Any, budget: str | None) -> int:
    """``--stream``: `kronc.compile(folder, stream=True)`, calibration text tokenized with the folder's tokenizer."""
    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        raise UsageError(f"--stream needs a Hugging Face folder (config.json + safetensors); {args.model} is not one")
    if args.recover_text:
        raise UsageError("--stream does not recover yet: compress with --stream, then recover the loaded model")
    with scale_dist.joined_from_env():  # under torchrun: join the group, the ranks split the work
        return _stream(args, out, policy, budget, folder)


def _stream(args: argparse.Namespace, out: Path, policy: Any, budget: str | None, folder: Path) -> int:
    calibration = None
    if args.calibration:
        calibration = calibration_batches(args, _folder_lm(folder))
        policy = data_aware(policy, budget)
    t = time.perf_counter()
    path, report = kronc.compile(str(folder), budget, policy=policy, calibration=calibration, stream=True, out=out,
                                 max_memory=args.max_memory, offload_activations=args.offload_activations,
                                 progress=not args.quiet, report=True)
    if scale_dist.rank() == 0:
        plan = report.plan
        print(plan.table())
        print()
        stored = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
        print(f"in-scope weights {size(plan.bytes_before)} -> {size(plan.bytes_after)} ({plan.ratio:.2f}x); streamed in "
              f"{time.perf_counter() - t:.1f}s on {scale_dist.world()} rank(s)")
        print(f"saved to {path} ({size(stored)} of tensors in {len(list(Path(path).glob('*.safetensors')))} shards); "
              f"load with kronc.load({str(path)!r})")
    return EXIT_OK


def _folder_lm(folder: Path) -> Any:
    """What calibration needs of a Hugging Face folder, read without loading its weights."""
    import json

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    causal = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or [])
    return SimpleNamespace(spec=str(folder), task="causal-lm" if causal else "model", tokenizer=folder_tokenizer(folder),
                           max_length=config.get("max_position_embeddings"))


def check_writable(out: Path) -> None:
    """Fail now, not after minutes of compressing, when ``out`` cannot be created or replaced.

    kronc.save writes a temporary folder beside ``out`` and moves it into place, so the probe is a
    folder made and removed in the nearest existing folder above ``out``.
    """
    above = out.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise NotADirectoryError(f"--out {out}: {above} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".kronc-probe-", dir=above))
    except OSError as e:
        raise PermissionError(f"--out {out}: cannot create folders in {above} ({e.strerror})") from None


def _recovery_recipe(args: argparse.Namespace, policy: Any) -> Any:
    """The policy's recovery recipe (or the defaults) with the command line's overrides; None: no recovery."""
    if not args.recover_text:
        return None
    recipe = (policy.recovery if policy is not None else None) or RecoveryConfig()
    update = {k: v for k, v in (("steps", args.recover_steps), ("max_seconds", args.recover_seconds),
                                ("method", args.recover_method), ("shard", args.recover_shard or None)) if v is not None}
    return RecoveryConfig.model_validate({**recipe.model_dump(), **update})


def _recovery_data(args: argparse.Namespace, resolved: Any, recipe: Any) -> tuple[Any, Any] | None:
    """Token ids of ``--recover-text`` for ``resolved``'s model, and the recipe fitted to the model."""
    if recipe is None:
        return None
    if resolved.task == "char-lm" and isinstance(resolved.tokenizer, dict):  # fixed-context char models
        ids = encode_chars(resolved.tokenizer, _recovery_text(args.recover_text, recipe))[0]
        recipe = recipe.model_copy(update={"seq_len": resolved.context or recipe.seq_len, "lm": 0.0})
    else:
        vocab = vocab_size(resolved.model)
        tokenizer = resolved.tokenizer or (ByteTokenizer(vocab) if vocab else None)
        if tokenizer is None:
            raise UsageError(f"--recover-text needs a model that reads token ids; {resolved.spec} is {resolved.task}",
                             "recover it from Python: kronc.recover(small, model, batches)")
        ids = token_ids(tokenizer, _recovery_text(args.recover_text, recipe))
        if resolved.max_length and recipe.seq_len > resolved.max_length:
            recipe = recipe.model_copy(update={"seq_len": resolved.max_length})
    ids = torch.as_tensor(ids, dtype=torch.long)
    make_batches(ids, recipe)  # too short or empty: RecoveryError now, not after compressing
    return ids, recipe


def _recovery_text(name: str, recipe: Any) -> str:
    if name == "kjv":
        return kjv_text(max_chars=8 * recipe.steps * recipe.batch_size * (recipe.seq_len + 1))
    return read_text(Path(name))


def _recover(args: argparse.Namespace, resolved: Any, small: Any, ids: Any, recipe: Any) -> str:
    """Run `kronc.recover` on the compressed model (trained in place); returns the line to print."""
    result = recover(small, resolved.model, ids, recipe, progress=not args.quiet and scale_dist.rank() == 0)
    source = "kjv" if args.recover_text == "kjv" else Path(args.recover_text).name
    if not result.history:  # block-wise without an end-to-end pass
        return f"recovered on {source}: {result}"
    first, last = result.history[0], result.history[-1]
    return (f"recovered on {source}: {result.steps} steps ({result.stopped}), {result.tokens} tokens in "
            f"{result.seconds:.1f}s; training loss {first.loss:.4g} -> {last.loss:.4g}")
