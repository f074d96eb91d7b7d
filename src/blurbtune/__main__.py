"""`python -m blurbtune ...`: the same as the `blurbtune` command."""

import sys

from blurbtune.cli import main

sys.exit(main())
