"""The ``qjournal`` command, qemu-img style: one module per command family."""
from .app import main

__all__ = ["main"]
