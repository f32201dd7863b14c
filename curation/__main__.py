"""``python -m curation``: see curation/cli.py."""

from curation.cli import main

raise SystemExit(main())
