"""``python -m giva_ext <command>``: the same as the ``giva`` console script."""
from .cli import main

raise SystemExit(main())
