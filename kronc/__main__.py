"""``python -m kronc``: the ``kronc`` command (see `kronc.tools.cli`)."""

import sys

from .tools.cli import main

sys.exit(main())
