"""The report of a crashsim run: JSON for tools, one self-contained HTML page for people.

The page needs nothing but itself: inline CSS, inline SVG, no script, no fonts, no
links out. Every string from the run (workload names, call sites, explanations, qemu-img
errors) is escaped. What it shows, top to bottom:

- ``#summary``: crash states by workload × strategy × outcome (``#summary-table``), and
  one line per workload (``#workloads-table``);
- ``#barriers``: the barriers of every transaction against the minimum the protocol
  needs (``#barrier-table``), an *under* row being an ordering bug and an *over* row a
  cost;
- one ``section.workload#workload-<name>`` per workload: its timeline
  (``svg#timeline-<name>``, see :mod:`crashsim.svg`), its recorded entries, and every
  failing state (``details.failure#state-<id>``) with the persisted, dropped and torn
  writes, their call sites, the invariant broken, the explanation and the seed.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from html import escape
from typing import Iterable

from .model import COMBINED, STRATEGIES, CrashState, EntryInfo, Fate, RunResult, Verdict, WorkloadResult
from .svg import COLOURS, LABELS, display_outcome, legend_svg, slug, state_anchor, \
    svg_timeline, tx_status

#: Failing states detailed per workload; the rest are counted, and all are in the JSON.
MAX_FAILURES = 40

_FATE_ORDER = {"persisted": 0, "dropped": 1, "torn": 2}

_CSS = """
body { font: 14px/1.4 "DejaVu Sans", Arial, sans-serif; color: #222; margin: 16px 24px; max-width: 1400px; }
h1 { font-size: 22px; margin: 0 0 6px; } h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; margin: 18px 0 6px; } h4 { font-size: 13px; margin: 10px 0 4px; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 2px 7px; text-align: left; vertical-align: top; }
th { background: #e8edf3; } td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td.zero { color: #bbb; } tr.summary-total td { font-weight: bold; background: #fafafa; }
td.fail-unexpected { background: #f6c3c3; font-weight: bold; } td.fail-expected { background: #fbe3b5; }
tr.tx-under td { background: #f6c3c3; } tr.tx-over td { background: #fbe3b5; } tr.tx-equal td.delta { color: #3f9a3c; }
.badge { display: inline-block; padding: 0 6px; border-radius: 3px; color: #fff; font-size: 12px; font-weight: bold; }
.badge.ok { background: #3f9a3c; } .badge.failed { background: #d62728; } .badge.control { background: #f58518; }
.banner { padding: 8px 12px; border-radius: 4px; font-weight: bold; margin: 8px 0; }
.banner.ok { background: #dff0d8; } .banner.failed { background: #f6c3c3; }
code, pre { font-family: "DejaVu Sans Mono", monospace; font-size: 12px; }
pre { background: #f6f6f6; padding: 6px 8px; white-space: pre-wrap; margin: 4px 0; }
pre.error { background: #f6c3c3; }
.meta { color: #555; } .swatch { display: inline-block; width: 10px; height: 10px; border-radius: 5px; }
figure { margin: 8px 0; overflow-x: auto; } figcaption { color: #555; font-size: 12px; }
details { margin: 4px 0; } details > summary { cursor: pointer; }
details.failure { border-left: 4px solid #d62728; padding: 2px 0 2px 8px; margin: 6px 0; }
details.failure > summary { font-weight: bold; }
"""


def write_report(result: RunResult, path: str) -> None:
    """Write ``result`` to ``path``: JSON when the name ends in ``.json``, else the HTML page."""
    text = result.dumps() if path.endswith(".json") else render_html(result)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def render_html(result: RunResult, *, max_failures: int = MAX_FAILURES) -> str:
    """The report as one self-contained HTML page; at most ``max_failures`` detailed per workload."""
    failures = sum(len(w.failures) for w in result.workloads)
    title = (f"crashsim report: {len(result.workloads)} workloads, {result.states} crash states, "
             f"{failures} failing, {'PASS' if result.ok else 'FAIL'}")
    o = result.options
    options = (f"strategies {', '.join(o.strategies)}; k = {o.k}; {o.samples} samples; seed {o.seed}; "
               f"{o.sector_size}-byte sectors; at most {o.max_tears} tears; qemu-img oracle: {o.oracle}"
               + (f" ({o.oracle_samples} samples)" if o.oracle == "sample" else "")
               + f"; {result.seconds:.1f} s")
    if result.ok:
        banner = '<p class="banner ok" id="verdict">PASS: every workload behaved as expected.</p>'
    else:
        bad = [w.name for w in result.workloads if not w.ok]
        banner = (f'<p class="banner failed" id="verdict">FAIL: {len(bad)} workload(s) did not behave as expected: '
                  f'{", ".join(_link("workload-" + slug(n), n) for n in bad)}.</p>')
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<header><h1>crashsim report</h1>",
        banner,
        f'<p class="meta" id="options">{escape(options)}</p></header>',
        _summary(result),
        _barriers(result.workloads),
    ]
    parts.extend(_workload(w, result.options.seed, max_failures) for w in result.workloads)
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _link(anchor: str, text: str) -> str:
    return f'<a href="#{escape(anchor)}">{escape(text)}</a>'


def _num(n: int, cls: str = "") -> str:
    c = "n" + (" zero" if n == 0 else "") + (" " + cls if cls and n else "")
    return f'<td class="{c}">{n if n else "·"}</td>'


def _status(w: WorkloadResult) -> str:
    if w.error:
        return '<span class="badge failed">ERROR</span>'
    if w.expect_failure:
        return (f'<span class="badge {"control" if w.ok else "failed"}">negative control: '
                f'{"failures found" if w.ok else "NO FAILURE FOUND"}</span>')
    return '<span class="badge ok">ok</span>' if w.ok else '<span class="badge failed">FAILED</span>'


def _summary(result: RunResult) -> str:
    extra = sorted({k for w in result.workloads for c in w.counts for k in c.outcomes} - set(COMBINED))
    outcomes = list(COMBINED) + extra
    head = ("<tr><th>workload</th><th>strategy</th><th class=n>generated</th><th class=n>unique</th>"
            + "".join(f'<th class=n><span class="swatch" style="background:{COLOURS.get(k, "#8c8c8c")}"></span> '
                      f'{escape(LABELS.get(k, k))}</th>' for k in outcomes)
            + f'<th class=n><span class="swatch" style="background:{COLOURS["leaks"]}"></span> of which leak</th>'
              "</tr>")
    rows = [head]
    for w in result.workloads:
        strategy_of = {s.id: s.strategy for s in w.states}
        leaks: Counter[str] = Counter(strategy_of.get(v.state_id, "?") for v in w.verdicts
                                      if display_outcome(v) == "leaks")
        order = {s: i for i, s in enumerate(STRATEGIES)}
        counts = sorted(w.counts, key=lambda c: (order.get(c.strategy, len(order)), c.strategy))
        fail_cls = "fail-expected" if w.expect_failure else "fail-unexpected"
        span = len(counts) + 1
        name = (f'<td rowspan="{span}">{_link("workload-" + slug(w.name), w.name)}<br>{_status(w)}</td>')
        total: Counter[str] = Counter()
        gen = uniq = 0
        for i, c in enumerate(counts):
            cells = "".join(_num(c.outcomes.get(k, 0), fail_cls if k == "fail" and c.outcomes.get(k) else "")
                            for k in outcomes)
            rows.append(f'<tr class="summary-row" data-workload="{escape(w.name)}" data-strategy="{escape(c.strategy)}">'
                        f'{name if i == 0 else ""}<td>{escape(c.strategy)}</td>{_num(c.generated)}{_num(c.unique)}'
                        f'{cells}{_num(leaks[c.strategy])}</tr>')
            total.update(c.outcomes)
            gen += c.generated
            uniq += c.unique
        cells = "".join(_num(total[k], fail_cls if k == "fail" and total[k] else "") for k in outcomes)
        rows.append(f'<tr class="summary-total" data-workload="{escape(w.name)}">{"" if counts else name}'
                    f'<td>all</td>{_num(gen)}{_num(uniq)}{cells}{_num(sum(leaks.values()))}</tr>')
    wrows = ["<tr><th>workload</th><th>journaled</th><th class=n>entries</th><th class=n>writes</th>"
             "<th class=n>barriers</th><th class=n>transactions</th><th class=n>states</th><th class=n>failing</th>"
             "<th class=n>seconds</th><th>status</th></tr>"]
    for w in result.workloads:
        kinds = Counter(e.kind for e in w.entries)
        wrows.append(f'<tr class="workload-row" data-workload="{escape(w.name)}">'
                     f'<td>{_link("workload-" + slug(w.name), w.name)}</td><td>{"yes" if w.journaled else "no"}</td>'
                     f'{_num(len(w.entries))}{_num(kinds["write"])}{_num(kinds["barrier"])}'
                     f'{_num(len(w.transactions))}{_num(len(w.states))}'
                     f'{_num(len(w.failures), "fail-expected" if w.expect_failure else "fail-unexpected")}'
                     f'<td class=n>{w.seconds:.2f}</td><td>{_status(w)}</td></tr>')
    return ('<section id="summary"><h2>Crash states by workload, strategy and outcome</h2>'
            '<p class="meta">Unique states per outcome: the qjournal view after recovery (old or new), '
            '"bitmaps dropped" when a reader that ignores the journal finds the bitmaps inconsistent, '
            '"FAIL" when any check failed; "of which leak": accepted states in which that reader finds '
            'leaked clusters.</p>'
            f'<table id="summary-table">{"".join(rows)}</table>'
            f'<table id="workloads-table">{"".join(wrows)}</table></section>')


def _barriers(workloads: Iterable[WorkloadResult]) -> str:
    rows = ["<tr><th>workload</th><th class=n>tx</th><th>description</th><th>entries</th><th>steps</th>"
            "<th class=n>barriers</th><th class=n>minimum</th><th class=n>Δ</th><th>why the minimum</th></tr>"]
    for w in workloads:
        for t in w.transactions:
            status = tx_status(t.barriers, t.minimum)
            delta = t.barriers - t.minimum
            rows.append(f'<tr class="tx tx-{status}" data-workload="{escape(w.name)}">'
                        f'<td>{escape(w.name)}</td><td class=n>{t.index}</td><td>{escape(t.description)}</td>'
                        f'<td>{t.first_entry}..{t.last_entry}</td><td>{escape(" → ".join(t.steps))}</td>'
                        f'<td class=n>{t.barriers}</td><td class=n>{t.minimum}</td>'
                        f'<td class="n delta">{"=" if not delta else f"{delta:+d}"}</td>'
                        f'<td>{escape(t.minimum_reason)}</td></tr>')
    return ('<section id="barriers"><h2>Barriers per transaction</h2>'
            '<p class="meta">Barriers issued (both files) against the minimum the ordering rule needs: '
            'fewer is an ordering bug, more is a cost.</p>'
            f'<table id="barrier-table">{"".join(rows)}</table></section>')


def _entry_text(e: EntryInfo | None, index: int) -> str:
    if e is None:
        return f"#{index}"
    if e.kind == "write":
        return f"#{index} {e.file} write {e.length} B @ {e.offset:#x}"
    if e.kind == "resize":
        return f"#{index} {e.file} resize to {e.length:#x}"
    if e.kind == "barrier":
        return f"#{index} {e.file} barrier"
    return f"#{index} mark {e.name}"


def _where(w: WorkloadResult, point: int) -> str:
    """Words for crash point ``point``."""
    if point <= 0:
        return "before the first entry"
    if point - 1 < len(w.entries):
        e = w.entries[point - 1]
        return f"after {_entry_text(e, point - 1)}" + (f" ({e.site})" if e.site else "")
    return f"after entry {point - 1}"


def _fates_table(fates: Iterable[Fate], entries: dict[int, EntryInfo], cls: str) -> str:
    rows = ["<tr><th>fate</th><th>file</th><th>unit</th><th>writes</th><th>call sites</th><th>torn sectors</th></tr>"]
    for f in sorted(fates, key=lambda f: (_FATE_ORDER.get(f.fate, 3), f.file, f.offset)):
        unit = f"page @ {f.offset:#x}" if f.unit == "page" else f"size {f.offset:#x}"
        writes = "<br>".join(escape(_entry_text(entries.get(i), i)) for i in f.entries)
        sites = "<br>".join(f"<code>{escape(s)}</code>" for s in f.sites)
        torn = ""
        if f.fate == "torn":
            torn = (f"new: {', '.join(str(s) for s in f.new_sectors) or 'none'} "
                    f"({f.sector_size}-byte sectors; the rest old)")
        rows.append(f'<tr class="fate fate-{escape(f.fate)}"><td>{escape(f.fate)}</td><td>{escape(f.file)}</td>'
                    f"<td>{escape(unit)}</td><td>{writes}</td><td>{sites}</td><td>{escape(torn)}</td></tr>")
    return f'<table class="{cls}">{"".join(rows)}</table>'


def _failure(w: WorkloadResult, s: CrashState, v: Verdict, entries: dict[int, EntryInfo], run_seed: int,
             first: bool) -> str:
    seed = (f"{s.seed}: <code>crashsim run --seed {s.seed}</code> draws this state again"
            if s.seed is not None else f"enumerated, no seed needed (run seed {run_seed})")
    facts = [
        f"<b>crash point</b> {s.point}, {escape(_where(w, s.point))}",
        f"<b>strategy</b> {escape(s.strategy)}: {escape(s.description)}",
        f"<b>seed</b> {seed}",
        f"<b>content</b> <code>{escape(s.digest)}</code>"
        + (f", {s.duplicates} more candidate(s) had the same content" if s.duplicates else ""),
    ]
    if s.parent is not None:
        facts.append(f"<b>recovery interrupted</b> of {_link(state_anchor(s.parent), s.parent)} "
                     f"at level {s.recovery.count('/') + 1}: <code>{escape(s.recovery)}</code>")
    oracle = "not run"
    if v.oracle is not None:
        r = v.oracle
        oracle = (f"{r.outcome}: qemu-img check exit {r.check_exit}, {r.corruptions} corruptions, {r.leaks} leaks"
                  + (f"; {r.error}" if r.error else ""))
    views = ("<tr><th>view</th><th>outcome</th><th>allowed</th><th>details</th></tr>"
             f"<tr><td>qjournal (recovers)</td><td>{escape(v.qjournal)}</td>"
             f"<td>{escape(', '.join(v.allowed_qjournal))}</td><td>recovered: {'yes' if v.recovered else 'no'}; "
             f"second recovery idempotent: {'yes' if v.idempotent else '<b>NO</b>'}</td></tr>"
             f"<tr><td>plain (ignores the journal)</td><td>{escape(v.plain)}</td>"
             f"<td>{escape(', '.join(v.allowed_plain))}</td><td>{v.corruptions} corruptions, {v.leaks} leaks</td></tr>"
             f"<tr><td>qemu-img (oracle)</td><td>{escape(v.oracle.outcome if v.oracle else '—')}</td>"
             f"<td>{escape(', '.join(v.allowed_plain)) if v.oracle else ''}</td><td>{escape(oracle)}</td></tr>")
    minimal = ""
    if v.minimal:
        minimal = ("<h4>A smallest set of in-flight writes that still fails</h4>"
                   + _fates_table(v.minimal, entries, "fates minimal"))
    in_flight = (_fates_table(s.fates, entries, "fates") if s.fates
                 else '<p class="meta">No write was in flight: every unit holds its durable content.</p>')
    return (f'<details class="failure" id="{escape(state_anchor(s.id))}"{" open" if first else ""}>'
            f'<summary><span class="badge failed">FAIL</span> <code>{escape(s.id)}</code>: '
            f'<span class="invariant">{escape(v.invariant or "(no invariant named)")}</span></summary>'
            f'<p>{"<br>".join(facts)}</p>'
            f'<table class="views">{views}</table>'
            + (f'<pre class="explanation">{escape(v.explanation)}</pre>' if v.explanation else "")
            + "<h4>Writes in flight: persisted, dropped, torn</h4>" + in_flight + minimal + "</details>")


def _workload(w: WorkloadResult, run_seed: int, max_failures: int) -> str:
    sid = slug(w.name)
    entries = {e.index: e for e in w.entries}
    states = {s.id: s for s in w.states}
    failing = [(states[v.state_id], v) for v in w.failures if v.state_id in states]
    shown = failing[:max_failures]
    parts = [f'<section class="workload" id="workload-{escape(sid)}">',
             f"<h2>{escape(w.name)} {_status(w)}</h2>",
             f"<p>{escape(w.description)}</p>",
             f'<p class="meta">{"journaled" if w.journaled else "bypasses the journal"}; '
             f"{len(w.entries)} entries, {len(w.transactions)} transaction(s), {len(w.states)} unique states, "
             f"returned at entry {w.returned_at}; {w.seconds:.2f} s</p>"]
    if w.base:
        parts.append(f"<details><summary>Starting image</summary><pre>{escape(w.base)}</pre></details>")
    if w.error:
        parts.append(f'<pre class="error">{escape(w.error)}</pre>')
    parts.append(f'<figure id="figure-{escape(sid)}">{legend_svg(w.name + "-legend")}<br>'
                 f"{svg_timeline(w, linked={s.id for s, _ in shown})}"
                 "<figcaption>Entries in their global order; barriers as black bars; a dot per crash point and "
                 "outcome (hover for the states, click a red one for its failure). Shaded: after the workload "
                 "returned, where only the new state is allowed.</figcaption></figure>")
    parts.append(f"<details><summary>Semantic states (old, new)</summary><h4>old</h4><pre>{escape(w.old)}</pre>"
                 f"<h4>new</h4><pre>{escape(w.new)}</pre></details>")
    parts.append(_entries_table(w))
    parts.append(f'<section class="failures" id="failures-{escape(sid)}">')
    if not failing:
        parts.append("<h3>No failing state</h3>" + ("<p><b>This negative control should have failed: "
                                                    "the checks missed a known bug.</b></p>" if w.expect_failure
                                                    else "") + "</section></section>")
        return "\n".join(parts)
    parts.append(f"<h3>{len(failing)} failing state(s)"
                 + (" (expected: a negative control)" if w.expect_failure else "") + "</h3>")
    by_invariant: dict[str, list[CrashState]] = defaultdict(list)
    for s, v in failing:
        by_invariant[v.invariant].append(s)
    rows = ["<tr><th>invariant broken</th><th class=n>states</th><th>strategies</th><th>first</th></tr>"]
    for inv, ss in by_invariant.items():
        strategies = Counter(s.strategy for s in ss)
        first = ss[0].id
        link = _link(state_anchor(first), first) if any(s.id == first for s, _ in shown) else escape(first)
        rows.append(f'<tr class="invariant-row"><td>{escape(inv or "(none named)")}</td><td class=n>{len(ss)}</td>'
                    f'<td>{escape(", ".join(f"{k} {n}" for k, n in strategies.items()))}</td><td>{link}</td></tr>')
    parts.append(f'<table class="invariants">{"".join(rows)}</table>')
    parts.extend(_failure(w, s, v, entries, run_seed, i == 0) for i, (s, v) in enumerate(shown))
    if len(failing) > len(shown):
        parts.append(f'<p class="meta">{len(failing) - len(shown)} more failing state(s) not detailed here; '
                     "every one is in the JSON report.</p>")
    parts.append("</section></section>")
    return "\n".join(parts)


def _entries_table(w: WorkloadResult) -> str:
    rows = ["<tr><th class=n>#</th><th>kind</th><th>file</th><th>what</th><th>call site</th></tr>"]
    for e in w.entries:
        if e.kind == "write":
            what = f"{e.length} B @ {e.offset:#x}"
        elif e.kind == "resize":
            what = f"to {e.length:#x}"
        elif e.kind == "barrier":
            what = ", ".join(f"{ln} B @ {off:#x}" for off, ln in e.ranges) or "no range (covers nothing)"
        else:
            what = e.name
        rows.append(f'<tr class="entry-row {escape(e.kind)}"><td class=n>{e.index}</td><td>{escape(e.kind)}</td>'
                    f"<td>{escape(e.file)}</td><td>{escape(what)}</td><td><code>{escape(e.site)}</code></td></tr>")
    return (f"<details><summary>Recorded entries ({len(w.entries)})</summary>"
            f'<table class="entries">{"".join(rows)}</table></details>')

