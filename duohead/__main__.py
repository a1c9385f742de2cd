"""`python -m duohead ...` runs the `duohead` command (duohead.commands.main)."""

import sys

from duohead.commands.main import main

sys.exit(main())
