"""``python -m kronc.tools.cli``: the ``kronc`` command."""

import sys

from .main import main

sys.exit(main())
