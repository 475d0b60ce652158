"""`python -m flowproof`: the same as the `flowproof` command."""

from flowproof.cli import main

raise SystemExit(main())
