"""`python -m duohead ...` runs the `duohead` command (duohead.cli)."""

import sys

from duohead.cli import main

sys.exit(main())
