"""`python -m raydraft`: the CLI from a source tree, e.g. a `ray job submit` working dir."""

import sys

from raydraft.cli import main

sys.exit(main())
