"""`python -m mlsyskit ...`: the same as the `mlsyskit` command (used to start serving replicas)."""

import sys

from mlsyskit.cli import main

sys.exit(main())
