"""The byte store under an image: the ``Medium`` protocol, ``MmapMedium`` and
``FileMedium`` (every byte the editor changes passes through ``Medium.write``; the
``System`` seam is where crashsim records their system calls), the read-only overlay,
and QEMU's OFD image locks. No qcow2 knowledge."""
