"""Reading what the commands are given: the model, the policy and budget, calibration and evaluation text."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

import kronc

from ...budget import Budget
from ...policies import Policy, list_policies
from ...tokens import token_ids
from ..data import abc_news_text, kjv_text
from ..resolve_model import ModelSpecError, resolve
from .args import UsageError


def resolve_spec(spec: str, *, architecture: str | None = None, for_compression: bool = False) -> Any:
    if for_compression and Path(spec).is_dir() and (Path(spec) / "kronc.json").is_file():
        raise ModelSpecError(f"{spec} is already a compressed kronc model; compress its uncompressed source instead")
    return resolve(spec, architecture=architecture)


def policy_and_budget(args: argparse.Namespace) -> tuple[Any, str | None]:
    if not args.budget and not args.policy:
        raise UsageError("give a budget (--budget 25x) or a policy (--policy edge-25x)",
                         "shipped policies: " + ", ".join(shipped_policies()))
    budget = str(Budget.parse(args.budget)) if args.budget else None
    policy = kronc.load_policy(args.policy) if args.policy else None
    return policy, budget


def data_aware(policy: Policy | None, budget: str | None) -> Policy:
    if policy is None:
        policy = Policy(budget=budget or "1x")
    if policy.objective != "data":
        print("note: calibration given: planning with the data-aware objective", file=sys.stderr)
        policy = policy.data_aware()
    return policy


def calibration_batches(args: argparse.Namespace, resolved: Any) -> list[Any] | None:
    if not args.calibration:
        return None
    if resolved.task != "causal-lm" or resolved.tokenizer is None:
        raise UsageError(f"--calibration text needs a language model with a tokenizer; {resolved.spec} is {resolved.task}")
    length = min(args.calibration_length, resolved.max_length or args.calibration_length)
    if args.calibration == "kjv":
        body = kjv_text(max_chars=8 * length * args.calibration_windows)  # ample: a token is several characters
    else:
        body = read_text(Path(args.calibration))
    ids = token_ids(resolved.tokenizer, body)
    n = min(args.calibration_windows, ids.numel() // length)
    if n < 1:
        raise UsageError(f"{args.calibration} has {ids.numel()} tokens, fewer than one window of {length}")
    return [ids[i * length:(i + 1) * length].reshape(1, -1).to(torch.long) for i in range(n)]


def eval_text(path: Path | None) -> tuple[str, str]:
    if path is not None:
        return path.name, read_text(path)
    return "ABC news (lee_background.cor)", abc_news_text()


def read_text(path: Path) -> str:
    """A text file's contents; a named pipe (``--text <(zcat corpus.gz)``) is read like a file."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a text file")
    if not (path.is_file() or path.is_fifo()):
        if path.exists():
            raise FileNotFoundError(f"{path} is not a regular file or a pipe")
        raise FileNotFoundError(f"{path} does not exist")
    return path.read_text(encoding="utf-8")


def shipped_policies() -> list[str]:
    return list(list_policies())
