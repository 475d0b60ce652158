"""`python -m lab …`: the same command line as `flowproof lab …`."""

import sys

from lab.cli import main

sys.exit(main(sys.argv[1:]))
