"""python -m bench: the benchmark command (see bench.cli)."""

import sys

from bench.cli import main

sys.exit(main())
