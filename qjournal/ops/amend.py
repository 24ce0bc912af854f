"""Change an image's creation options in place, as ``qemu-img amend -o ...`` does.

What qjournal amends, and what it refuses (block/qcow2.c ``qcow2_amend_options``):

======================  ==============================================================
``lazy_refcounts``      on/off: the compatible feature bit, in one journaled header
                        write. ``on`` needs a v3 image, as in QEMU. Turning it off on
                        an image left dirty is safe: the writable open has already
                        rebuilt the refcounts and cleared the dirty bit.
``compat``              the same version: nothing to do. ``0.10`` on a v3 image is
                        refused with the reason when the image has extended L2 entries
                        (as QEMU refuses) or persistent bitmaps (QEMU 7.2 goes on and
                        leaves an orphan bitmaps extension, every bitmap inconsistent,
                        its clusters leaked); any other version change is refused as
                        not implemented yet (use ``qemu-img amend``).
``refcount_bits``       the same width: nothing to do; another width is refused as not
                        implemented yet.
creation-only options   ``cluster_size``, ``extended_l2``, ``preallocation``,
                        ``compression_type``, ``backing_fmt``, ``size``...: refused, as
                        qemu-img refuses them
======================  ==============================================================

Every refusal comes before anything is written, and names the option.
"""
from __future__ import annotations

from ..core.image import Image
from ..errors import UnsupportedError, UsageError
from ..format.header import COMPAT_LAZY_REFCOUNTS, INCOMPAT_EXTL2
from .create import COMPAT_ALIASES, parse_options, split_options

AMENDABLE = ("compat", "lazy_refcounts", "refcount_bits")
CREATION_ONLY = ("cluster_size", "extended_l2", "preallocation", "compression_type", "size", "encrypt",
                 "backing_file", "backing_fmt", "data_file", "data_file_raw")


def amend(img: Image, spec: str) -> None:
    """Apply the ``-o`` list ``spec`` to ``img`` (open ``r+``), or refuse it whole."""
    if not img.writable:
        raise UsageError(f"{img.path}: open the image writable to amend it")
    options = split_options(spec)
    if not options:
        raise UsageError("must specify options (-o)")
    values: dict[str, str] = {}
    for key, value in options:
        if key in CREATION_ONLY:
            raise UsageError(f"invalid parameter {key!r}: this option is only supported for image creation")
        if key not in AMENDABLE:
            raise UsageError(f"invalid parameter {key!r} (amend takes {', '.join(AMENDABLE)})")
        values[key] = value
    h = img.header
    version = h.version
    if "compat" in values:
        if values["compat"] not in COMPAT_ALIASES:
            raise UsageError(f"compat={values['compat']}: expected 0.10, 1.1, v2 or v3")
        target = 3 if parse_options(f"compat={values['compat']}").compat == "1.1" else 2
        if target < version:
            if h.incompatible_features & INCOMPAT_EXTL2:
                raise UsageError(f"{img.path}: cannot downgrade to compat=0.10: the image has extended L2 "
                                 f"entries (incompatible feature {INCOMPAT_EXTL2:#x}), which version 2 lacks")
            if img.entries:
                raise UsageError(f"{img.path}: cannot downgrade to compat=0.10: the image has "
                                 f"{len(img.entries)} persistent bitmap(s), which version 2 cannot hold "
                                 "(qemu-img 7.2 goes on and leaves them inconsistent and their clusters "
                                 "leaked): remove them first")
        if target != version:
            raise UnsupportedError(f"{img.path}: changing compat from version {version} to {target} is not "
                                   "implemented in qjournal yet (qemu-img amend does it)")
    if "refcount_bits" in values:
        bits = parse_options(f"refcount_bits={values['refcount_bits']}").refcount_bits
        if bits != 1 << h.refcount_order:
            raise UnsupportedError(f"{img.path}: changing refcount_bits from {1 << h.refcount_order} to {bits} "
                                   "is not implemented in qjournal yet (qemu-img amend does it)")
    if "lazy_refcounts" in values:
        lazy = parse_options(f"lazy_refcounts={values['lazy_refcounts']}").lazy_refcounts
        if lazy and version < 3:
            raise UsageError("lazy refcounts only supported with compatibility level 1.1 and above "
                             "(use compat=1.1 or greater)")
        features = (h.compatible_features | COMPAT_LAZY_REFCOUNTS) if lazy else \
            (h.compatible_features & ~COMPAT_LAZY_REFCOUNTS)
        if features != h.compatible_features:
            # One header field, one sector: the header switch (header-switched).
            with img.transaction(f"amend lazy_refcounts={'on' if lazy else 'off'}") as tx:
                tx.set_header(compatible_features=features)
