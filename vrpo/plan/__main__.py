"""``python -m vrpo.plan``: the thin CLI (the flags and the work are in :mod:`vrpo.plan.cli`)."""

import sys

from .cli import main

sys.exit(main())
