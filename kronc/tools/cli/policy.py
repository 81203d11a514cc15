"""``kronc policy validate|schema|list``: check policy files, print the policy JSON schema, list shipped policies."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...policies import PolicyError, list_policies, load_policy
from ...policies.schema import schema_text
from .args import EPILOG, EXIT_FAILED, EXIT_OK, Parser, UsageError, one_line

HELP = "validate policy files, print the policy JSON schema, list shipped policies"


def configure(p: argparse.ArgumentParser) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    psub = p.add_subparsers(dest="policy_command", metavar="ACTION", parser_class=Parser)
    q = psub.add_parser("validate", help="check policy files; one line per problem", description="check policy files",
                        epilog=EPILOG, formatter_class=fmt)
    q.add_argument("files", nargs="+", metavar="FILE|NAME")
    q.set_defaults(func=cmd_policy_validate)
    q = psub.add_parser("schema", help="print the JSON schema policy files follow", description="print the JSON schema",
                        epilog=EPILOG, formatter_class=fmt)
    q.add_argument("--out", "-o", type=Path, metavar="FILE", help="write it to FILE instead of printing it")
    q.set_defaults(func=cmd_policy_schema)
    q = psub.add_parser("list", help="list the policies findable by name", description="list shipped policies",
                        epilog=EPILOG, formatter_class=fmt)
    q.set_defaults(func=cmd_policy_list)


def run(args: argparse.Namespace) -> int:
    raise UsageError("kronc policy needs an action: validate, schema or list", "run 'kronc policy --help'")


def cmd_policy_validate(args: argparse.Namespace) -> int:
    failed = 0
    for source in args.files:
        try:
            policy = load_policy(source)
        except PolicyError as e:
            failed += 1
            for problem in e.problems:
                print(f"{problem}", file=sys.stderr)
        else:
            print(f"{source}: ok (budget {policy.budget}, {len(policy.rules)} rules, objective {policy.objective})")
    if failed:
        print(f"{failed} of {len(args.files)} policies have problems", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def cmd_policy_schema(args: argparse.Namespace) -> int:
    text = schema_text()
    if args.out:
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_policy_list(args: argparse.Namespace) -> int:
    for name, path in list_policies().items():
        try:
            pol = load_policy(path)
            what = f"budget {pol.budget}: {pol.description.strip()}" if pol.description else f"budget {pol.budget}"
        except Exception as e:  # noqa: BLE001 - list the broken file too
            what = f"invalid ({one_line(e)})"
        print(f"{name:<14} {what}  [{path}]")
    return EXIT_OK
