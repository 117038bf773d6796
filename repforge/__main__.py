"""`python -m repforge ...`: what `ray job submit` runs (same as the `repforge` console script)."""

import sys

from repforge.cli import main

sys.exit(main())
