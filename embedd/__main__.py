"""`python -m embedd`: the same as the `embedd` command."""

from embedd.cli.main import main

raise SystemExit(main())
