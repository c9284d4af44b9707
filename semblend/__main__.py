"""``python -m semblend`` runs the ``semblend`` CLI."""

from semblend.cli import main

main()
