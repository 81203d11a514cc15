"""Every exception to one exit code, one line and a hint."""

from __future__ import annotations

from ...budget import BudgetError
from ...capture import CaptureError
from ...formats import FormatError
from ...inputs import InputError
from ...planning import PlanningError
from ...policies import PolicyError
from ...recover import RecoveryError
from ...serialize import KroncFileError
from ..report import ResultsError
from ..resolve_model import ModelSpecError, accepted_forms
from ..zoo import MissingPackageError
from .args import EXIT_FAILED, EXIT_INPUT, EXIT_MISSING, UsageError, one_line


def classify(e: BaseException) -> tuple[int, str, str | None]:
    """Exit code, one-line message and hint for an exception."""
    text = one_line(e)
    if isinstance(e, MissingPackageError):
        return EXIT_MISSING, text, "install the package named above (or pick another --model / pass --text FILE)"
    if isinstance(e, UsageError):
        return EXIT_INPUT, text, e.hint or "run 'kronc COMMAND --help' for the arguments"
    if isinstance(e, PolicyError):
        problems = e.problems
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        source = problems[0].source if problems else "FILE"
        if problems and problems[0].path.startswith("scope"):
            hint = "widen scope.include (patterns are matched against site names, see 'kronc explain') or scope.kinds"
        elif source.startswith("<"):
            hint = "check the policy keys named above"
        else:
            hint = f"run 'kronc policy validate {source}'"
        return EXIT_INPUT, f"invalid policy: {problems[0] if problems else text}{more}", hint
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
    if isinstance(e, InputError):
        return EXIT_INPUT, text, "check the model, calibration text and example inputs named above"
    if isinstance(e, FormatError):
        return EXIT_INPUT, text, "a format parameter does not fit a weight: check the policy's format choices"
    if isinstance(e, PlanningError):
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
