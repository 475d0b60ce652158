"""`python -m agent`: run the node agent (same as `flowproof agent`)."""

import sys

from agent.runtime import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
