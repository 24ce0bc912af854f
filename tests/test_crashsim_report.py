"""The crashsim report: its JSON round trip, and its HTML page as a real browser shows it.

Oracles:
- the model: ``RunResult.from_json(to_json())`` gives back an equal result, whose page
  is byte for byte the same;
- Debian's headless Chromium: it loads the written page from a file, with no network.
  The DOM it dumps must hold every summary-table row and the SVG timeline's writes,
  barriers, marks and crash dots; its 1280×2000 screenshot must show the table's and
  the timeline's colours (decoded here with zlib and numpy, pixel by pixel).
"""
from __future__ import annotations

import json
import re
import struct
import subprocess
import zlib
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import attrs
import numpy as np

from crashsim.model import (COMBINED, CrashState, EntryInfo, Fate, OracleResult, Options, RunResult, StrategyCount,
                            TransactionInfo, Verdict, WorkloadResult)
from crashsim.report import render_html, write_report
from crashsim.svg import COLOURS, FILE_COLOURS, display_outcome, svg_timeline

HOSTILE = "<script>alert('x')</script> & \"quoted\""
SITE_HDR = "qjournal.image:412 _write_header"


# -- a small run, built by hand ---------------------------------------------------------

class Recording:
    """Entries in their global order, as a recording medium would number them."""

    def __init__(self) -> None:
        self.entries: list[EntryInfo] = []

    def add(self, kind: str, file: str, site: str, **kw: Any) -> int:
        self.entries.append(EntryInfo(index=len(self.entries), kind=kind, file=file, site=site, **kw))
        return len(self.entries) - 1


def seed_protocol() -> tuple[list[EntryInfo], TransactionInfo, dict[str, int]]:
    """bitmap add through the journal: precommit, commit, then the seed's three steps."""
    r = Recording()
    at: dict[str, int] = {}
    r.add("resize", "journal", "qjournal.journal.file:61 create", length=0x10000)
    r.add("mark", "journal", "qjournal.journal.log:40 begin", name="tx-begin")
    at["data"] = r.add("write", "image", "qjournal.bitmaps:233 add", offset=0x70000, length=0x10000)
    r.add("write", "image", "qjournal.bitmaps:240 add", offset=0x80000, length=512)
    r.add("barrier", "image", "qjournal.journal.tx:118 precommit", ranges=((0x70000, 0x20000),))
    for k in range(4):
        r.add("write", "journal", "qjournal.journal.log:88 append", offset=512 * k, length=512)
    r.add("barrier", "journal", "qjournal.journal.tx:131 commit")
    at["commit"] = r.add("mark", "journal", "qjournal.journal.tx:132 commit", name="commit")
    at["clear"] = r.add("write", "image", SITE_HDR, offset=0x58, length=8)
    r.add("barrier", "image", "qjournal.journal.apply:52 step", ranges=((0, 4096),))
    r.add("mark", "image", "qjournal.journal.apply:53 step", name="autoclear-cleared")
    at["dir"] = r.add("write", "image", "qjournal.bitmaps:301 _write_directory", offset=0x60000, length=4096)
    at["ref"] = r.add("write", "image", "qjournal.refcount:77 _set", offset=0x10000, length=512)
    r.add("barrier", "image", "qjournal.journal.apply:52 step", ranges=((0x60000, 4096), (0x10000, 4096)))
    r.add("mark", "image", "qjournal.journal.apply:53 step", name="directory-written")
    at["set"] = r.add("write", "image", SITE_HDR, offset=0x58, length=8)
    r.add("barrier", "image", "qjournal.journal.apply:52 step", ranges=((0, 4096),))
    r.add("mark", "image", "qjournal.journal.apply:53 step", name="autoclear-set")
    r.add("write", "journal", "qjournal.journal.log:88 append", offset=2048, length=512)
    at["returned"] = r.add("mark", "image", "crashsim.workloads:20 run", name="returned")
    steps = ("autoclear-cleared", "directory-written", "autoclear-set")
    tx = TransactionInfo(index=0, description="bitmap add backup-1", first_entry=1, last_entry=at["returned"] - 1,
                         steps=steps, barriers=5, minimum=5, minimum_reason="precommit 1 + commit 1 + 3 steps")
    return r.entries, tx, at


def verdict(state: CrashState, qjournal: str, plain: str, *, ok: bool = True, leaks: int = 0, invariant: str = "",
            explanation: str = "", oracle: OracleResult | None = None, minimal: tuple[Fate, ...] = ()) -> Verdict:
    return Verdict(state_id=state.id, qjournal=qjournal, plain=plain, leaks=leaks, corruptions=0 if ok else 1,
                   recovered=qjournal == "new", idempotent=ok, oracle=oracle,
                   allowed_qjournal=("old", "new"), allowed_plain=("old", "new", "dropped"), ok=ok,
                   invariant=invariant, explanation=explanation, minimal=minimal)


def counts(states: list[CrashState], verdicts: list[Verdict]) -> tuple[StrategyCount, ...]:
    by: dict[str, Counter[str]] = {}
    dup: Counter[str] = Counter()
    for s, v in zip(states, verdicts):
        by.setdefault(s.strategy, Counter())[v.combined] += 1
        dup[s.strategy] += s.duplicates
    return tuple(StrategyCount(strategy=k, generated=sum(c.values()) + dup[k], unique=sum(c.values()),
                               outcomes={o: c[o] for o in COMBINED if c[o]}) for k, c in by.items())


def journaled_workload() -> WorkloadResult:
    """A clean prefix and barrier sweep, leaks after the return, one torn header that fails."""
    entries, tx, at = seed_protocol()
    states: list[CrashState] = []
    verdicts: list[Verdict] = []
    n = len(entries)
    for t in range(n + 1):
        s = CrashState(id=f"bitmap-add/prefix/{t}", workload="bitmap-add", strategy="prefix", point=t,
                       description=f"entries 0..{t - 1} in order", digest=f"{t:032x}", duplicates=t % 3)
        after_commit = t > at["commit"]
        plain = "dropped" if at["clear"] < t <= at["set"] else "new" if t > at["set"] else "old"
        states.append(s)
        verdicts.append(verdict(s, "new" if after_commit else "old", plain, leaks=int(t > at["returned"] - 2)))
    for k, t in enumerate((at["dir"] + 1, at["ref"] + 1)):
        s = CrashState(id=f"bitmap-add/subset/{k}", workload="bitmap-add", strategy="subset", point=t,
                       description="directory page persisted, refcount page dropped", digest=f"s{k:031x}",
                       fates=(Fate("image", "page", 0x60000, "persisted", (at["dir"],), ("qjournal.bitmaps:301",)),),
                       seed=7)
        states.append(s)
        verdicts.append(verdict(s, "new", "dropped"))
    torn = (Fate("image", "page", 0x0, "torn", (at["set"],), (SITE_HDR,), new_sectors=(0,), sector_size=512),
            Fate("image", "page", 0x60000, "dropped", (at["dir"],), ("qjournal.bitmaps:301 _write_directory",)),
            Fate("image", "page", 0x10000, "persisted", (at["ref"],), ("qjournal.refcount:77 _set",)))
    s = CrashState(id="bitmap-add/torn/0", workload="bitmap-add", strategy="torn", point=at["set"] + 1,
                   description="header page torn at 512-byte sectors", digest="t" * 32, fates=torn, seed=1234)
    states.append(s)
    oracle = OracleResult(check_exit=2, corruptions=1, leaks=0, bitmaps=(("backup-1", 65536, ("auto",)),),
                          outcome="other", error="qemu-img: Could not open 'x': " + HOSTILE)
    verdicts.append(verdict(s, "new", "other", ok=False, invariant="bitmap claims consistency but misses writes",
                            explanation="autoclear bit set while the directory page was dropped\n" + HOSTILE,
                            oracle=oracle, minimal=torn[:2]))
    return WorkloadResult(name="bitmap-add", description="add a bitmap in one transaction " + HOSTILE,
                          expect_failure=False, journaled=True, base="qemu-img create -f qcow2 disk 1G",
                          entries=tuple(entries), returned_at=at["returned"], transactions=(tx,),
                          states=tuple(states), verdicts=tuple(verdicts), counts=counts(states, verdicts),
                          old="backup-0 65536 auto", new="backup-0 65536 auto\nbackup-1 65536 auto",
                          seconds=1.25)


def control_workload() -> WorkloadResult:
    """A negative control: the directory rewritten in place, with no autoclear protocol."""
    r = Recording()
    r.add("mark", "image", "crashsim.workloads:40 unsafe", name="tx-begin")
    first = r.add("write", "image", "crashsim.workloads:44 unsafe", offset=0x60000, length=4096)
    r.add("write", "image", "crashsim.workloads:45 unsafe", offset=0x61000, length=4096)
    r.add("barrier", "image", "crashsim.workloads:46 unsafe", ranges=((0x60000, 8192),))
    ret = r.add("mark", "image", "crashsim.workloads:47 unsafe", name="returned")
    states: list[CrashState] = []
    verdicts: list[Verdict] = []
    for t in range(len(r.entries) + 1):
        s = CrashState(id=f"unsafe-dir/prefix/{t}", workload="unsafe-dir", strategy="prefix", point=t,
                       description="in order", digest=f"u{t:031x}")
        states.append(s)
        bad = t == first + 1
        verdicts.append(verdict(s, "other" if bad else "old" if t <= first else "new",
                                "other" if bad else "old" if t <= first else "new", ok=not bad,
                                invariant="bitmap directory half written" if bad else ""))
    for k in range(3):
        s = CrashState(id=f"unsafe-dir/subset/{k}", workload="unsafe-dir", strategy="subset", point=first + 2,
                       description="one page of two", digest=f"v{k:031x}", seed=99,
                       fates=(Fate("image", "page", 0x60000 + 0x1000 * (k % 2), "dropped", (first + k % 2,),
                                   ("crashsim.workloads:44 unsafe",)),))
        states.append(s)
        verdicts.append(verdict(s, "other", "other", ok=False, invariant="bitmap directory half written"))
    tx = TransactionInfo(index=0, description="directory in place", first_entry=0, last_entry=ret - 1,
                         steps=("directory-written",), barriers=1, minimum=3,
                         minimum_reason="the seed protocol: three ordered steps")
    return WorkloadResult(name="unsafe-dir", description="rewrite the directory in place", expect_failure=True,
                          journaled=False, base="qemu-img create", entries=tuple(r.entries), returned_at=ret,
                          transactions=(tx,), states=tuple(states), verdicts=tuple(verdicts),
                          counts=counts(states, verdicts), old="a", new="b", seconds=0.5)


def sample_result() -> RunResult:
    return RunResult(options=Options(seed=1234), workloads=(journaled_workload(), control_workload()), seconds=2.5)


# -- JSON ---------------------------------------------------------------------------------

class TestJson:
    def test_round_trip_gives_the_same_result_and_page(self, tmp_path: Path) -> None:
        result = sample_result()
        path = tmp_path / "run.json"
        write_report(result, str(path))
        loaded = RunResult.from_json(json.loads(path.read_text()))
        assert loaded == result
        assert RunResult.from_json(result.to_json()) == result
        assert render_html(loaded) == render_html(result)


# -- HTML, as text ------------------------------------------------------------------------

class TestHtml:
    def test_every_string_is_escaped(self) -> None:
        page = render_html(sample_result())
        assert "<script" not in page
        assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;" in page

    def test_self_contained_and_links_resolve(self) -> None:
        page = render_html(sample_result())
        assert not re.search(r"<(link|img|iframe|object|embed)\b|\bsrc=|url\((?!#)|@import", page)
        assert set(re.findall(r"https?://[^\"' ]+", page)) == {"http://www.w3.org/2000/svg"}
        ids = re.findall(r'\bid="([^"]+)"', page)
        assert len(ids) == len(set(ids)), [i for i, c in Counter(ids).items() if c > 1]
        targets = set(re.findall(r'href="#([^"]+)"', page))
        assert targets and targets <= set(ids)

    def test_failures_show_fates_sites_invariant_and_seed(self) -> None:
        page = render_html(sample_result())
        torn = page[page.index('id="state-bitmap-add-torn-0"'):]
        torn = torn[:torn.index("</details>")]
        for fate in ("persisted", "dropped", "torn"):
            assert f'class="fate fate-{fate}"' in torn
        assert SITE_HDR in torn and "qjournal.refcount:77 _set" in torn
        assert "bitmap claims consistency but misses writes" in torn
        assert "crashsim run --seed 1234" in torn
        assert "new: 0 (512-byte sectors; the rest old)" in torn

    def test_few_failures_detailed_all_counted(self) -> None:
        page = render_html(sample_result(), max_failures=1)
        assert page.count('class="failure"') == 2          # one per workload
        assert "3 more failing state(s)" in page            # unsafe-dir fails 4 states

    def test_a_workload_that_could_not_run(self) -> None:
        broken = attrs.evolve(control_workload(), entries=(), transactions=(), states=(), verdicts=(), counts=(),
                              error="Traceback: " + HOSTILE)
        page = render_html(attrs.evolve(sample_result(), workloads=(broken,)))
        assert '<pre class="error">Traceback: &lt;script&gt;' in page and "<script" not in page
        ElementTree.fromstring(svg_timeline(broken))

    def test_timeline_wraps_and_is_well_formed_svg(self) -> None:
        w = journaled_workload()
        svg = svg_timeline(w, per_row=8)
        root = ElementTree.fromstring(svg)
        ns = "{http://www.w3.org/2000/svg}"
        rows = root.findall(f"{ns}g[@class='row']")
        assert len(rows) == -(-(len(w.entries) + 1) // 8)
        width, height = float(root.get("width", 0)), float(root.get("height", 0))
        dots = root.iter(f"{ns}circle")
        for c in dots:
            assert 0 < float(c.get("cx", 0)) < width and 0 < float(c.get("cy", 0)) < height
        writes = [e for e in root.iter(f"{ns}rect") if (e.get("class") or "").startswith("entry write")]
        assert len(writes) == sum(e.kind == "write" for e in w.entries)


# -- HTML, in a browser -------------------------------------------------------------------

class Dom(HTMLParser):
    """Every element of a dumped DOM with its classes, its id and the ids of the elements around it.

    Chromium serialises every non-void element with an end tag, SVG ones included.
    """

    VOID = {"br", "meta", "hr", "img", "input", "link", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.found: list[tuple[str, set[str], str, tuple[str, ...]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.found.append((tag, set((a.get("class") or "").split()), a.get("id") or "", tuple(self.stack)))
        if tag not in self.VOID:
            self.stack.append(a.get("id") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag not in self.VOID:
            self.stack.pop()

    def count(self, tag: str, cls: str = "", inside: str = "") -> int:
        return sum(1 for t, c, _, up in self.found
                   if t == tag and (not cls or cls in c) and (not inside or inside in up))


def read_png(path: Path) -> np.ndarray:
    """The pixels of an 8-bit RGB or RGBA PNG as an (h, w, channels) uint8 array."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + width * bpp)
    out = np.zeros((height, width * bpp), dtype=np.uint8)
    prev = np.zeros(width * bpp, dtype=np.int64)
    for y in range(height):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int64)
        if f == 0:
            cur = line
        elif f == 1:
            cur = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) & 0xFF
        elif f == 2:
            cur = (line + prev) & 0xFF
        else:                               # average and Paeth: sequential within the row
            cur = line.copy()
            for x in range(width * bpp):
                a = int(cur[x - bpp]) if x >= bpp else 0
                b = int(prev[x])
                if f == 3:
                    cur[x] = (cur[x] + (a + b) // 2) & 0xFF
                else:
                    c = int(prev[x - bpp]) if x >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    cur[x] = (cur[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        out[y] = cur
        prev = cur
    return out.reshape(height, width, bpp)


def rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


class TestBrowser:
    def test_chromium_renders_the_table_and_the_timeline(self, tmp_path: Path) -> None:
        result = sample_result()
        page = tmp_path / "report.html"
        shot = tmp_path / "report.png"
        write_report(result, str(page))
        run = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--force-color-profile=srgb",
             f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
             "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr[-2000:]

        dom = Dom()
        dom.feed(run.stdout)
        assert re.search(r"<head>.*<title>crashsim report: 2 workloads, \d+ crash states, 5 failing, FAIL</title>",
                         run.stdout, re.S)
        assert dom.count("tr", "summary-row", inside="summary-table") == sum(len(w.counts) for w in result.workloads)
        assert dom.count("tr", "summary-total", inside="summary-table") == len(result.workloads)
        assert dom.count("tr", "tx", inside="barrier-table") == 2
        for w in result.workloads:
            tl = f"timeline-{w.name}"
            assert dom.count("svg", inside=f"figure-{w.name}") == 2        # legend and timeline
            kinds = Counter(e.kind for e in w.entries)
            assert dom.count("rect", "write", inside=tl) == kinds["write"]
            assert dom.count("g", "barrier", inside=tl) == kinds["barrier"]
            assert dom.count("g", "mark", inside=tl) == kinds["mark"]
            shown = {(s.point, display_outcome(v)) for s, v in zip(w.states, w.verdicts)}
            assert dom.count("circle", "crash", inside=tl) == len(shown)
            assert dom.count("circle", "crash-fail", inside=tl) == len({p for p, o in shown if o == "fail"}) > 0
            assert dom.count("details", "failure", inside=f"failures-{w.name}") == len(w.failures)

        px = read_png(shot)
        assert px.shape[:2] == (2000, 1280)
        flat = px[:, :, :3].reshape(-1, 3)
        colours = {tuple(c) for c in np.unique(flat[::7], axis=0)}
        assert len(colours) > 50                                        # text, tables, shapes: not blank
        assert (flat != 255).any(axis=1).mean() > 0.02

        def rows_with(colour: str, pixels: int = 1) -> np.ndarray:
            return np.nonzero((px[:, :, :3] == rgb(colour)).all(axis=2).sum(axis=1) >= pixels)[0]

        def seen(colour: str, top: int, bottom: int) -> bool:
            rows = rows_with(colour)
            return bool(((rows >= top) & (rows < bottom)).any())

        header = rows_with("#e8edf3", 300)                  # table header cells
        lanes = rows_with("#f4f4f4", 300)                   # timeline lane backgrounds
        assert len(header) and len(lanes) and header[0] < lanes[0]
        top = int(lanes[0])                                 # the first timeline's image lane
        assert seen(FILE_COLOURS["image"], top, top + 22)
        assert seen(FILE_COLOURS["journal"], top + 22, top + 44)
        for outcome in ("old", "new", "dropped", "leaks", "fail"):
            assert seen(COLOURS[outcome], top + 44, top + 110), outcome   # dots in the lanes below
