"""`python -m embedd`: the same as the `embedd` command."""

from embedd.cli import main

raise SystemExit(main())
