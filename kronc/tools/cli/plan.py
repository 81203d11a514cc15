"""``kronc plan``: print (and save) the plan for MODEL without writing a model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import kronc

from .args import EXIT_OK, budget_args, calibration_args, model_arg, quiet_arg
from .inputs import calibration_batches, data_aware, policy_and_budget, resolve_spec

HELP = "print the plan (one format per site) for MODEL without writing a model"


def configure(p: argparse.ArgumentParser) -> None:
    model_arg(p)
    budget_args(p)
    calibration_args(p)
    p.add_argument("--save", type=Path, metavar="FILE", help="also write the plan (.json, .yaml); replay with kronc.apply")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    quiet_arg(p)


def run(args: argparse.Namespace) -> int:
    policy, budget = policy_and_budget(args)
    resolved = resolve_spec(args.model, for_compression=True)
    calibration = calibration_batches(args, resolved)
    if calibration is not None:
        policy = data_aware(policy, budget)
    the_plan = kronc.plan(resolved.model, policy, budget=budget, calibration=calibration,
                          example_inputs=resolved.example_inputs, progress=not args.quiet)
    if args.save:
        the_plan.save(args.save)
    print(json.dumps(the_plan.model_dump(mode="json"), indent=1) if args.json else the_plan.table())
    if args.save:
        print(f"wrote {args.save}", file=sys.stderr)
    return EXIT_OK
