"""``kronc explain``: which policy rule governs each site of MODEL."""

from __future__ import annotations

import argparse
import warnings

import kronc

from ...policies import PolicyWarning
from .args import EXIT_OK, model_arg
from .inputs import resolve_spec

HELP = "show which policy rule governs each site of MODEL"


def configure(p: argparse.ArgumentParser) -> None:
    model_arg(p)
    p.add_argument("--policy", "-p", required=True, metavar="FILE|NAME", help="policy file or shipped policy name")


def run(args: argparse.Namespace) -> int:
    policy = kronc.load_policy(args.policy)
    resolved = resolve_spec(args.model, for_compression=True)
    captured = kronc.capture(resolved.model, resolved.example_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PolicyWarning)  # the table prints them as warning: lines
        explanation = kronc.explain(policy, captured)
    print(f"policy {policy.name or args.policy}: budget {policy.budget}, objective {policy.objective}, "
          f"{len(policy.rules)} rules")
    print(explanation.table())
    return EXIT_OK
