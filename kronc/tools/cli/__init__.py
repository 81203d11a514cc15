"""The ``kronc`` command line: compress, plan, explain, eval, report, policy and demo.

One module per subcommand (``HELP``, ``configure(parser)``, ``run(args)``), each a thin wrapper over the
Python API (`kronc.compile`, `kronc.plan`, `kronc.explain`, `kronc.save`/`kronc.load`,
`kronc.tools.evaluate`, `kronc.tools.report`). Errors print one line ``kronc: error: ...`` and a
``hint: ...`` line to stderr and exit with the codes in `args`.
"""

from __future__ import annotations

from .args import EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_MISSING, EXIT_OK, UsageError
from .errors import classify
from .main import build_parser, main

__all__ = [
    "EXIT_FAILED", "EXIT_INPUT", "EXIT_INTERRUPTED", "EXIT_MISSING", "EXIT_OK", "UsageError", "build_parser",
    "classify", "main",
]
