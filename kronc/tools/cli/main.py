"""``kronc``'s entry point: the parser (one subcommand per module of this package) and ``main``."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType

from ...scale import distributed as scale_dist
from . import compress, demo, explain, policy, report
from . import eval as eval_command
from . import plan as plan_command
from .args import EPILOG, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OK, Parser, kronc_version, print_error
from .errors import classify

COMMANDS: dict[str, ModuleType] = {
    "compress": compress,
    "plan": plan_command,
    "explain": explain,
    "eval": eval_command,
    "report": report,
    "policy": policy,
    "demo": demo,
}
"""Each subcommand's module: its ``HELP`` line, ``configure(parser)`` and ``run(args) -> exit code``."""


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = Parser(prog="kronc", description="Compress language models by rewriting their compute graph.",
                    epilog=EPILOG, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"kronc {kronc_version()}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, epilog=EPILOG, formatter_class=fmt)
        p.set_defaults(func=module.run)
        module.configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kronc`` command; returns the exit code. Run as a command (``argv`` None) by a torchrun rank, it
    leaves the process at once with that code after flushing its output (see `kronc.scale.distributed.left_group`)."""
    code = _run(argv)
    if argv is None and scale_dist.left_group():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_INPUT
    try:
        return int(args.func(args) or EXIT_OK)
    except KeyboardInterrupt:
        print_error("interrupted", None)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `kronc ... | head`: the reader left; stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - every error becomes one line and an exit code
        code, message, hint = classify(e)
        if args.traceback or os.environ.get("KRONC_TRACEBACK"):
            traceback.print_exc()
        print_error(message, hint)
        return code
