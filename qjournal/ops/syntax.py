"""QEMU's syntax for numbers, sizes and option lists, as qemu-img and qemu-io parse them.

``1.5G`` and ``0x1000`` (:func:`parse_size`), C's ``strtoull`` (:func:`strtou64`),
``key=value,,more,nokey`` (:func:`split_options`). Every command's arguments go through
these; they need nothing but the standard library, so a command that only reads a
header does not load the operations to parse its arguments.
"""
from __future__ import annotations

import re

from ..errors import UsageError

INT64_MAX = (1 << 63) - 1       # the range of QEMU's size options (int64_t)

_SUFFIX = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_SPACE = " \t\n\v\f\r"


def strtosz(text: str) -> int:
    """QEMU 7.2's ``qemu_strtosz``: an unsigned 64-bit byte count.

    Decimal (``1.5G``: a fraction needs a k/M/G/T/P/E suffix, rounded half up) or hex
    (``0x1000``, no fraction); one optional suffix letter, either case, ``B`` for
    bytes; leading white space allowed, nothing after the suffix. Raises ValueError
    (syntax) or OverflowError (above 2^64 - 1).
    """
    rest = text.lstrip(_SPACE)
    if rest[:1] == "-":
        raise ValueError(text)
    if rest[:1] == "+":
        rest = rest[1:]
    frac = 0  # 64-bit fixed-point fraction
    hexm = re.match(r"0[xX]([0-9a-fA-F]+)", rest)
    if hexm:
        val = int(hexm.group(1), 16)
        rest = rest[hexm.end():]
        if rest.startswith("."):
            raise ValueError(text)
    else:
        decm = re.match(r"[0-9]+", rest)
        if not decm:
            raise ValueError(text)
        val = int(decm.group())
        rest = rest[decm.end():]
        if rest.startswith("."):
            fm = re.match(r"\.([0-9]+)([eE][+-]?[0-9]+)?", rest)
            if fm is None or (float("0." + fm.group(1)) == 0.0 and fm.group(1).strip("0")):
                rest = rest[1:]  # strtod failed (or underflowed): "1.k" is 1k
            elif fm.group(2):
                raise ValueError(text)
            else:
                fraction = float("0." + fm.group(1))
                scaled = int(fraction * 2.0 ** 64)
                frac = scaled if scaled < 1 << 64 else 0  # C's out-of-range cast gives 0 on x86
                rest = rest[fm.end():]
    shift = 0
    if rest and rest[0].lower() in _SUFFIX:
        shift = _SUFFIX[rest[0].lower()]
        rest = rest[1:]
    if rest:
        raise ValueError(text)
    if val >= 1 << 64:
        raise OverflowError(text)
    if shift == 0:
        if frac:
            raise ValueError(text)
        return val
    whole = (val << shift) + ((frac << shift) >> 64) + (((frac << shift) >> 63) & 1)
    if whole >= 1 << 64:
        raise OverflowError(text)
    return whole


def parse_size(text: str) -> int:
    """Parse a size as qemu-img does: ``1024``, ``1k``, ``512M``, ``1.5G``, ``16T``, ``0x1000``.

    Suffixes k, M, G, T, P, E (either case) are binary multiples; ``B`` means bytes.
    A fraction needs a multiplying suffix and is rounded half up to a whole byte.
    The result lies in 0 .. 2^63 - 1. Raises :class:`~qjournal.errors.UsageError`.

    >>> parse_size("1.5G")
    1610612736
    """
    try:
        value = strtosz(text)
    except OverflowError:
        raise UsageError(f"size {text!r} is out of range: must be between 0 and {INT64_MAX}") from None
    except ValueError:
        raise UsageError(f"size {text!r} is not a size: use a number with an optional k, M, G, T, P or E "
                         "suffix (binary multiples; B for bytes), e.g. 1G or 1.5G") from None
    if value > INT64_MAX:
        raise UsageError(f"size {text!r} is out of range: must be between 0 and {INT64_MAX}")
    return value


def strtou64(text: str) -> int:
    """C's ``strtoull(text, &end, 0)`` with nothing after the number (QEMU numbers).

    Decimal, ``0x`` hex or ``0`` octal, optional sign (a minus wraps modulo 2^64, as C
    does). Raises ValueError (syntax) or OverflowError (above 2^64 - 1).

    >>> strtou64("0xab"), strtou64("010")
    (171, 8)
    """
    m = re.fullmatch(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text)
    if m is None:
        raise ValueError(text)
    digits = m.group(2)
    if digits[:2] in ("0x", "0X"):
        val = int(digits[2:], 16)
    elif digits.startswith("0"):
        val = int(digits, 8)
    else:
        val = int(digits)
    if val >= 1 << 64:
        raise OverflowError(text)
    return (-val) % (1 << 64) if m.group(1) == "-" else val


def split_options(spec: str) -> list[tuple[str, str]]:
    """QEMU's option-list syntax: ``key=value`` pairs split at commas, ``,,`` for a comma
    inside a value, a bare ``key`` meaning ``key=on`` and ``nokey`` meaning ``key=off``.

    >>> split_options("cluster_size=4k,nolazy_refcounts,backing_file=a,,b")
    [('cluster_size', '4k'), ('lazy_refcounts', 'off'), ('backing_file', 'a,b')]
    """
    trailing = len(spec) - len(spec.rstrip(","))
    if spec.startswith(",") or trailing % 2:
        raise UsageError(f"invalid option list {spec!r}: a leading or trailing comma (write ,, for a comma "
                         "inside a value)")
    out: list[tuple[str, str]] = []
    p = 0
    while p < len(spec):
        end = min((i for i in (spec.find("=", p), spec.find(",", p)) if i >= 0), default=len(spec))
        key, p = spec[p:end], end
        if p < len(spec) and spec[p] == "=":
            p += 1
            value = ""
            while True:
                comma = spec.find(",", p)
                if comma < 0:
                    value += spec[p:]
                    p = len(spec)
                    break
                if spec[comma + 1:comma + 2] == ",":
                    value += spec[p:comma + 1]
                    p = comma + 2
                    continue
                value += spec[p:comma]
                p = comma
                break
        elif key.startswith("no"):
            key, value = key[2:], "off"
        else:
            value = "on"
        if p < len(spec):
            p += 1  # the comma
        out.append((key, value))
    return out


__all__ = ["INT64_MAX", "parse_size", "split_options", "strtosz", "strtou64"]
