"""The ``qjournal`` command, qemu-img style: one module per command family."""
from .main import main

__all__ = ["main"]
