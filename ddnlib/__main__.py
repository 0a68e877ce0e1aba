"""``python -m ddnlib``: the command line (:mod:`ddnlib.cli`)."""

from .cli import main

raise SystemExit(main())
