"""`python -m phivision ...` runs the command line (see phivision.cli)."""

from .cli import main

raise SystemExit(main())
