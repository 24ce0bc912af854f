"""``python -m qjournal``: the ``qjournal`` command."""
import sys

from .cli import main

sys.exit(main())
