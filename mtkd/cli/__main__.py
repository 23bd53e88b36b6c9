"""``python -m mtkd.cli``: the same as ``mtkd``."""

import sys

from mtkd.cli import main

sys.exit(main())
