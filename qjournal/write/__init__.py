"""Guest writes: copy-on-write, zero and discard, bitmap bits, the staged guest map of a
transaction, the streaming writer of a new image, and the ``GuestDisk`` file view."""
