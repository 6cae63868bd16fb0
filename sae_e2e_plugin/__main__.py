"""``python -m sae_e2e_plugin`` runs the ``sae-e2e`` command line."""

from sae_e2e_plugin.cli import main

raise SystemExit(main())
