"""On-disk structures of qcow2, each declared once: header and feature bits, header
extensions, L1/L2 tables, refcount blocks, bitmap directory and tables, snapshot table,
LUKS header, and every offset, size and constant of the format (no I/O here)."""
