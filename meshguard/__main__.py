"""``python -m meshguard`` runs the CLI."""

from meshguard.cli import main

raise SystemExit(main())
