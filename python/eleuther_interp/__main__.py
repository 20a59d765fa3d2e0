"""``python -m eleuther_interp ...`` runs the ``hooks`` command line."""

from ._cli import main

main()
