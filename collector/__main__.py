"""`python -m collector`: the same as `flowproof collector`."""

from collector.runtime import main

raise SystemExit(main())
