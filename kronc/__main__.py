"""``python -m kronc``: the ``kronc`` command (see `kronc.cli`)."""

import sys

from .cli import main

sys.exit(main())
