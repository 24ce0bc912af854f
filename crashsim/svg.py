"""The write/barrier timeline of one workload, as a self-contained SVG (no script, no fonts).

Layout, read left to right: the x axis is the entry index in the one global order of
both files; long recordings wrap onto several rows of at most ``per_row`` entries. Each
row has, top to bottom:

- the transactions, as bars from their first to their last entry, coloured by their
  barrier count against the protocol's minimum (equal, over, under);
- the marks (``commit``, step names, ``returned``), as labelled ticks;
- two lanes, ``image`` and ``journal``: a write is a box whose height grows with the log
  of its length, a resize a hatched box, a barrier a vertical bar through its own lane;
- five crash-point lanes, one per outcome: a dot at the boundary ``T`` (entries
  ``0 .. T-1`` issued) when at least one state of that outcome was judged there;
- an axis of entry indices.

Every element carries a ``<title>`` (a tooltip in a browser) with its details, and a
class a test can find: ``entry write image``, ``barrier``, ``mark``, ``crash crash-fail``.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from html import escape
from typing import Collection

from .model import Verdict, WorkloadResult

#: Outcomes as the timeline and the report colour them. ``leaks`` is an accepted state
#: (old or new) in which the plain view (QEMU) finds leaked clusters; ``fail`` is any
#: state that broke a rule. The others are :data:`crashsim.model.COMBINED`.
DISPLAY_OUTCOMES = ("old", "new", "dropped", "leaks", "fail")
COLOURS = {
    "old": "#4c78a8",
    "new": "#3f9a3c",
    "dropped": "#f58518",
    "leaks": "#9c5fbf",
    "fail": "#d62728",
    "other": "#8c8c8c",
}
LABELS = {
    "old": "old",
    "new": "new",
    "dropped": "bitmaps dropped",
    "leaks": "old/new, leaks",
    "fail": "FAIL",
}
SHORT = {"old": "old", "new": "new", "dropped": "dropped", "leaks": "leaks", "fail": "FAIL"}
FILE_COLOURS = {"image": "#2a9d8f", "journal": "#c9a227"}
TX_COLOURS = {"equal": "#cfe8cf", "over": "#fbe3b5", "under": "#f6c3c3"}

_MARGIN_LEFT = 78
_MARGIN_RIGHT = 16
_TX_H = 16
_MARK_H = 84
_LANE_H = 22
_OUTCOME_H = 12
_AXIS_H = 16
_ROW_GAP = 14
_ROW_H = _TX_H + _MARK_H + 2 * _LANE_H + len(DISPLAY_OUTCOMES) * _OUTCOME_H + _AXIS_H + _ROW_GAP
_FONT = "font-family:DejaVu Sans,Arial,sans-serif"


def slug(name: str) -> str:
    """``name`` as an HTML id fragment: letters, digits, ``-``, ``_`` and ``.`` kept, the rest ``-``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def state_anchor(state_id: str) -> str:
    """The id of the element that details one state in the HTML report."""
    return "state-" + slug(state_id)


def display_outcome(v: Verdict) -> str:
    """One of :data:`DISPLAY_OUTCOMES` for ``v`` (``other`` for an outcome outside them)."""
    c = v.combined
    if c in ("old", "new") and (v.leaks or (v.oracle is not None and v.oracle.leaks)):
        return "leaks"
    return c if c in COLOURS else "other"


def tx_status(barriers: int, minimum: int) -> str:
    """``equal``, ``over`` or ``under``: a transaction's barriers against its minimum."""
    return "equal" if barriers == minimum else "over" if barriers > minimum else "under"


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << (shift - 3)) == 0:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


def _title(text: str) -> str:
    return f"<title>{escape(text)}</title>"


def legend_svg(key: str = "legend") -> str:
    """The legend of the timelines: outcomes, lanes, barriers, marks.

    ``key`` makes its pattern id unique when a page holds several legends.
    """
    hatch = escape("hatch-" + slug(key))
    items: list[tuple[str, str]] = []
    for o in DISPLAY_OUTCOMES:
        items.append((f'<circle cx="6" cy="0" r="5" fill="{COLOURS[o]}"/>', f"crash: {LABELS[o]}"))
    items.append((f'<rect x="0" y="-6" width="12" height="12" fill="{FILE_COLOURS["image"]}"/>', "image write"))
    items.append((f'<rect x="0" y="-6" width="12" height="12" fill="{FILE_COLOURS["journal"]}"/>',
                  "journal write"))
    items.append((f'<rect x="0" y="-6" width="12" height="12" fill="url(#{hatch})" stroke="#555"/>', "resize"))
    items.append(('<rect x="4" y="-8" width="3" height="16" fill="#111"/>', "barrier"))
    items.append(('<line x1="6" y1="-8" x2="6" y2="8" stroke="#7a4a9a" stroke-width="1.5"/>', "mark"))
    x = 4.0
    parts = []
    for glyph, label in items:
        parts.append(f'<g class="legend-item" transform="translate({x},12)">{glyph}'
                     f'<text x="17" y="4" font-size="11">{escape(label)}</text></g>')
        x += 26 + 6.3 * len(label)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="legend" width="{x:.0f}" height="24" '
            f'viewBox="0 0 {x:.0f} 24" style="{_FONT}">{_defs(hatch)}{"".join(parts)}</svg>')


def _defs(hatch: str) -> str:
    return (f'<defs><pattern id="{hatch}" width="4" height="4" patternUnits="userSpaceOnUse" '
            'patternTransform="rotate(45)"><rect width="4" height="4" fill="#ddd"/>'
            '<line x1="0" y1="0" x2="0" y2="4" stroke="#555" stroke-width="1.5"/></pattern></defs>')


def svg_timeline(w: WorkloadResult, *, per_row: int = 120, width: int = 1200,
                 linked: Collection[str] | None = None) -> str:
    """The timeline of ``w`` as an ``<svg id="timeline-<name>">`` element.

    ``per_row`` entries fit on a row before it wraps; ``width`` is the SVG's width in
    pixels when a full row is drawn. A failing dot links to ``#state-<id>`` of the first
    failing state at its point whose id is in ``linked`` (every state when ``None``).
    Cost: O(entries + states · log states).
    """
    n = len(w.entries)
    slots = n + 1                                   # crash points 0 .. n
    per_row = max(1, per_row)
    avail = width - _MARGIN_LEFT - _MARGIN_RIGHT
    step = min(24.0, avail / min(slots, per_row))
    rows = max(1, math.ceil(slots / per_row))
    full_w = _MARGIN_LEFT + step * min(slots, per_row) + _MARGIN_RIGHT
    height = rows * _ROW_H
    hatch = escape("hatch-" + slug(w.name))
    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="timeline-{escape(slug(w.name))}" class="timeline" '
        f'width="{full_w:.0f}" height="{height}" viewBox="0 0 {full_w:.0f} {height}" '
        f'style="{_FONT}" role="img" aria-label="{escape("timeline of " + w.name)}">',
        _title(f"{w.name}: {n} entries, {len(w.states)} crash states"),
        _defs(hatch),
    ]

    def place(i: int) -> tuple[float, int]:
        """The left x and the row's top y of slot ``i``."""
        r, c = divmod(i, per_row)
        return _MARGIN_LEFT + c * step, r * _ROW_H

    lane_y = {"image": _TX_H + _MARK_H, "journal": _TX_H + _MARK_H + _LANE_H}
    outcome_y0 = _TX_H + _MARK_H + 2 * _LANE_H
    axis_y = outcome_y0 + len(DISPLAY_OUTCOMES) * _OUTCOME_H

    # Row furniture: lane backgrounds, lane names, the axis with its ticks.
    tick = next((t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if t * step >= 40), 1000)
    for r in range(rows):
        top = r * _ROW_H
        first = r * per_row
        count = min(per_row, slots - first)
        x1 = _MARGIN_LEFT + count * step
        out.append(f'<g class="row" data-first="{first}">')
        for f, ly in lane_y.items():
            out.append(f'<rect class="lane lane-{f}" x="{_MARGIN_LEFT}" y="{top + ly + 1}" width="{count * step:.1f}" '
                       f'height="{_LANE_H - 2}" fill="#f4f4f4"/>'
                       f'<text x="{_MARGIN_LEFT - 6}" y="{top + ly + 15}" font-size="11" text-anchor="end">{f}</text>')
        for k, o in enumerate(DISPLAY_OUTCOMES):
            oy = top + outcome_y0 + k * _OUTCOME_H + _OUTCOME_H / 2
            out.append(f'<line x1="{_MARGIN_LEFT}" y1="{oy}" x2="{x1:.1f}" y2="{oy}" stroke="#e6e6e6"/>'
                       f'<text x="{_MARGIN_LEFT - 6}" y="{oy + 3.5}" font-size="9.5" text-anchor="end" '
                       f'fill="{COLOURS[o]}">{SHORT[o]}</text>')
        ay = top + axis_y + 2
        out.append(f'<line class="axis" x1="{_MARGIN_LEFT}" y1="{ay}" x2="{x1:.1f}" y2="{ay}" stroke="#888"/>')
        for at in range(first + (-first) % tick, first + count, tick):
            tx = _MARGIN_LEFT + (at - first) * step
            out.append(f'<line x1="{tx:.1f}" y1="{ay}" x2="{tx:.1f}" y2="{ay + 3}" stroke="#888"/>'
                       f'<text x="{tx:.1f}" y="{ay + 12}" font-size="9" text-anchor="middle" fill="#555">{at}</text>')
        out.append("</g>")

    # Crashes after the workload returned may only leave the new state: shade them.
    if 0 <= w.returned_at < n:
        for i in range(w.returned_at + 1, slots):
            x, y0 = place(i)
            out.append(f'<rect class="after-return" x="{x:.1f}" y="{y0 + lane_y["image"]}" width="{step:.1f}" '
                       f'height="{axis_y - lane_y["image"]}" fill="#000" fill-opacity="0.04"/>')

    # Transactions, split where a row wraps.
    for t in w.transactions:
        status = tx_status(t.barriers, t.minimum)
        tip = (f"transaction {t.index}: {t.description}\nentries {t.first_entry}..{t.last_entry}; "
               f"{t.barriers} barriers, minimum {t.minimum} ({t.minimum_reason})\nsteps: {', '.join(t.steps)}")
        i = t.first_entry
        labelled = False
        while i <= t.last_entry:
            r = i // per_row
            j = min(t.last_entry, (r + 1) * per_row - 1)
            x, y0 = place(i)
            bw = (j - i + 1) * step
            label = f"tx {t.index} (cont.)" if labelled else f"tx {t.index}: {t.barriers}/{t.minimum} barriers"
            labelled = True
            out.append(f'<g class="transaction tx-{status}"><rect x="{x:.1f}" y="{y0 + 2}" width="{bw:.1f}" '
                       f'height="{_TX_H - 4}" rx="3" fill="{TX_COLOURS[status]}" stroke="#999" stroke-width="0.5"/>')
            if bw > 6.2 * len(label):
                out.append(f'<text x="{x + 4:.1f}" y="{y0 + 12}" font-size="9.5">{escape(label)}</text>')
            out.append(_title(tip) + "</g>")
            i = j + 1

    # Entries.
    for e in w.entries:
        x, y0 = place(e.index)
        tip_site = f"\n{e.site}" if e.site else ""
        if e.kind == "mark":
            cx = x + step / 2
            label = e.name if len(e.name) <= 17 else e.name[:16] + "…"
            bold = ' font-weight="bold"' if e.name == "commit" else ""
            top = y0 + _TX_H
            out.append(f'<g class="mark" data-index="{e.index}">'
                       f'<line x1="{cx:.1f}" y1="{top + _MARK_H - 4}" x2="{cx:.1f}" y2="{y0 + outcome_y0}" '
                       f'stroke="#7a4a9a" stroke-width="1" stroke-dasharray="2,2"/>'
                       f'<text transform="translate({cx + 3:.1f},{top + _MARK_H - 5}) rotate(-90)" font-size="9"'
                       f' fill="#5a2a7a"{bold}>{escape(label)}</text>'
                       f'{_title(f"#{e.index} mark {e.name} ({e.file}){tip_site}")}</g>')
            continue
        ly = y0 + lane_y.get(e.file, lane_y["image"])
        if e.kind == "write":
            h = max(4.0, min(_LANE_H - 4.0, 4 + 1.2 * math.log2(max(e.length, 1) / 64 + 1)))
            bw = max(1.0, step - 1.5)
            out.append(f'<rect class="entry write {escape(e.file)}" data-index="{e.index}" x="{x + 0.75:.1f}" '
                       f'y="{ly + _LANE_H - 2 - h:.1f}" width="{bw:.1f}" height="{h:.1f}" '
                       f'fill="{FILE_COLOURS.get(e.file, "#777")}">'
                       f'{_title(f"#{e.index} {e.file} write {_size(e.length)} @ {e.offset:#x}{tip_site}")}</rect>')
        elif e.kind == "resize":
            bw = max(1.0, step - 1.5)
            out.append(f'<rect class="entry resize {escape(e.file)}" data-index="{e.index}" x="{x + 0.75:.1f}" '
                       f'y="{ly + 3}" width="{bw:.1f}" height="{_LANE_H - 6}" fill="url(#{hatch})" stroke="#555" '
                       f'stroke-width="0.5">{_title(f"#{e.index} {e.file} resize to {_size(e.length)}{tip_site}")}'
                       f'</rect>')
        elif e.kind == "barrier":
            what = ", ".join(f"{_size(ln)} @ {off:#x}" for off, ln in e.ranges) or "no range (covers nothing)"
            bx = x + step / 2 - 1.5
            out.append(f'<g class="barrier {escape(e.file)}" data-index="{e.index}">'
                       f'<line x1="{bx + 1.5:.1f}" y1="{y0 + lane_y["image"]}" x2="{bx + 1.5:.1f}" '
                       f'y2="{y0 + outcome_y0}" stroke="#111" stroke-opacity="0.25"/>'
                       f'<rect x="{bx:.1f}" y="{ly}" width="3" height="{_LANE_H}" fill="#111"/>'
                       f'{_title(f"#{e.index} {e.file} barrier: {what}{tip_site}")}</g>')

    # Crash points: one dot per (point, outcome), the states behind it in its tooltip.
    verdicts = {v.state_id: v for v in w.verdicts}
    by_point: dict[tuple[int, str], list[str]] = defaultdict(list)
    for s in w.states:
        v = verdicts.get(s.id)
        if v is not None:
            by_point[(s.point, display_outcome(v))].append(s.id)
    strategy_of = {s.id: s.strategy for s in w.states}
    r_dot = max(1.5, min(4.5, step / 2 - 0.5))
    for (point, outcome), ids in sorted(by_point.items()):
        if not 0 <= point < slots:
            continue
        x, y0 = place(point)
        k = DISPLAY_OUTCOMES.index(outcome) if outcome in DISPLAY_OUTCOMES else len(DISPLAY_OUTCOMES) - 1
        cy = y0 + outcome_y0 + k * _OUTCOME_H + _OUTCOME_H / 2
        counts: dict[str, int] = defaultdict(int)
        for sid in ids:
            counts[strategy_of[sid]] += 1
        where = f"after entry {point - 1}" if point else "before any entry"
        tip = (f"crash at {point} ({where}): {len(ids)} state(s) {LABELS.get(outcome, outcome)}\n"
               + ", ".join(f"{strategy} {c}" for strategy, c in counts.items())
               + "\n" + "\n".join(ids[:6]) + ("\n…" if len(ids) > 6 else ""))
        dot = (f'<circle class="crash crash-{outcome}" data-point="{point}" data-states="{len(ids)}" '
               f'cx="{x:.1f}" cy="{cy:.1f}" r="{r_dot:.1f}" fill="{COLOURS[outcome]}">{_title(tip)}</circle>')
        target = next((sid for sid in ids if linked is None or sid in linked), None) if outcome == "fail" else None
        if target is not None:
            dot = f'<a href="#{escape(state_anchor(target))}">{dot}</a>'
        out.append(dot)
    out.append("</svg>")
    return "".join(out)
