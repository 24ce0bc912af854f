"""crashsim's crash model, on small hand-made recordings.

Oracle: the model as DESIGN.md states it ("The crash model"), written out by hand for
each recording: which pages may hold which bytes, what a barrier makes durable, how a
file's size survives a crash, how a sector tears.
"""
from __future__ import annotations

import itertools

import pytest

from crashsim.recorder import IMAGE, JOURNAL, Entry, Recording
from crashsim.states import PAGE, Generator, Spec, Timeline, tear_masks

A, B, C = b"\xaa" * PAGE, b"\xbb" * PAGE, b"\xcc" * PAGE


def timeline(entries: list[Entry], image: bytes = bytes(4 * PAGE), sector: int = 512) -> Timeline:
    return Timeline(Recording({IMAGE: image, JOURNAL: b""}, entries), sector)


def images(tl: Timeline, specs: list[Spec]) -> set[bytes]:
    return {tl.materialize(s)[IMAGE] for s in specs}


def pages(data: bytes) -> list[bytes]:
    return [data[i:i + PAGE] for i in range(0, len(data), PAGE)]


def write(off: int, data: bytes, file: str = IMAGE) -> Entry:
    return Entry("write", file, off, data)


def barrier(*ranges: tuple[int, int], file: str = IMAGE) -> Entry:
    return Entry("barrier", file, ranges=ranges)


class TestSubsets:
    def test_every_subset_of_the_pages_in_flight(self) -> None:
        tl = timeline([write(0, A), write(PAGE, B), write(2 * PAGE, C), barrier((0, 3 * PAGE))])
        got = images(tl, [s for s in Generator(tl, "t").generate("subset") if s.point == 3])
        want = {b"".join(p) + bytes(PAGE) for p in itertools.product((bytes(PAGE), A), (bytes(PAGE), B),
                                                                      (bytes(PAGE), C))}
        assert got == want

    def test_a_barrier_makes_its_pages_durable(self) -> None:
        tl = timeline([write(0, A), barrier((0, PAGE)), write(PAGE, B), barrier((PAGE, PAGE))])
        after_first = [s for s in Generator(tl, "t").generate("subset") if s.point == 3]
        assert images(tl, after_first) == {A + bytes(3 * PAGE), A + B + bytes(2 * PAGE)}

    def test_an_image_barrier_covers_only_its_ranges_rounded_out_to_pages(self) -> None:
        # msync of 10 bytes at 100 makes page 0 durable, not page 1.
        tl = timeline([write(0, A), write(PAGE, B), barrier((100, 10)), barrier((2 * PAGE, 1))])
        assert tl.units(3) == [(0, PAGE)]
        assert images(tl, list(Generator(tl, "t").generate("barrier"))) == {A + bytes(3 * PAGE)}

    def test_a_barrier_of_no_range_covers_nothing(self) -> None:
        tl = timeline([write(0, A), barrier()])
        assert tl.units(2) == [(0, 0)]

    def test_a_journal_barrier_covers_the_whole_journal(self) -> None:
        tl = timeline([write(0, A, JOURNAL), write(PAGE, B, JOURNAL), barrier((0, 1), file=JOURNAL)])
        assert tl.units(3) == []
        assert tl.materialize(Spec("barrier", 3))[JOURNAL] == A + B

    def test_above_twelve_units_k_subsets_complements_and_seeded_samples(self) -> None:
        n = 14
        tl = timeline([write(i * PAGE, A) for i in range(n)] + [barrier((0, n * PAGE))], bytes(n * PAGE))
        specs = [s for s in Generator(tl, "t", k=1, samples=5, seed=7).generate("subset") if s.point == n]
        unseeded = [s for s in specs if s.seed is None]
        assert len(unseeded) == 2 * (1 + n)          # {} and its complement, each single unit and its complement
        assert sorted(len(s.choices) for s in unseeded) == sorted([0, n] + [1] * n + [n - 1] * n)
        samples = [s.choices for s in specs if s.seed == 7]
        assert len(samples) == 5
        again = [s.choices for s in Generator(tl, "t", k=1, samples=5, seed=7).generate("subset") if s.seed == 7]
        other = [s.choices for s in Generator(tl, "t", k=1, samples=5, seed=8).generate("subset") if s.seed == 8]
        assert samples == again and samples != other


class TestVersions:
    def test_a_page_written_twice_holds_each_version(self) -> None:
        tl = timeline([write(0, A), write(100, b"\x01" * 8), write(PAGE, B), barrier((0, 2 * PAGE))])
        got = images(tl, list(Generator(tl, "t").generate("versions")))
        assert A + bytes(3 * PAGE) in got               # the first version, the other page not written
        assert A + B + bytes(2 * PAGE) in got           # the first version, the other page written
        latest = A[:100] + b"\x01" * 8 + A[108:]
        prefix = images(tl, list(Generator(tl, "t").generate("prefix")))
        assert latest + B + bytes(2 * PAGE) in prefix


class TestSizes:
    def test_growth_is_durable_with_the_next_barrier_only(self) -> None:
        tl = timeline([write(2 * PAGE, A), barrier((2 * PAGE, PAGE)), write(3 * PAGE, B)], bytes(2 * PAGE))
        first = images(tl, [s for s in Generator(tl, "t").generate("subset") if s.point == 1])
        assert first == {bytes(2 * PAGE), bytes(3 * PAGE), bytes(2 * PAGE) + A}   # data without size is lost
        last = images(tl, [s for s in Generator(tl, "t").generate("subset") if s.point == 3])
        assert last == {bytes(2 * PAGE) + A, bytes(2 * PAGE) + A + bytes(PAGE), bytes(2 * PAGE) + A + B}

    def test_a_shrink_may_or_may_not_survive_and_regrowth_reads_zeros(self) -> None:
        tl = timeline([Entry("resize", IMAGE, size=PAGE + 10), Entry("resize", IMAGE, size=2 * PAGE),
                       barrier((0, 1))], A * 2)
        got = images(tl, list(Generator(tl, "t").generate("prefix")))
        assert (A + A)[:PAGE + 10] in got
        assert A + A[:10] + bytes(PAGE - 10) in got
        assert tl.materialize(Spec("barrier", 3))[IMAGE] == A + A[:10] + bytes(PAGE - 10)


class TestTears:
    def test_every_sector_pattern_of_a_page_within_the_bound(self) -> None:
        tl = timeline([write(0, A), barrier((0, PAGE))])
        torn = list(Generator(tl, "t", max_tears=254).generate("torn"))
        assert len(torn) == 254
        for data in images(tl, torn):
            sectors = [data[i:i + 512] for i in range(0, PAGE, 512)]
            assert all(s in (bytes(512), A[:512]) for s in sectors)
            assert sectors != [bytes(512)] * 8 and sectors != [A[:512]] * 8

    def test_the_bound_keeps_the_structured_tears(self) -> None:
        masks = tear_masks(list(range(8)), 32, __import__("random").Random(1))
        assert len(masks) == 32 and len(set(masks)) == 32
        assert 0b00000011 in masks and 0b11111100 in masks and 0b00000001 in masks and 0b11111110 in masks

    def test_only_differing_sectors_tear_and_4k_sectors_never(self) -> None:
        one = bytes(512) * 3 + A[:512] + bytes(2048)    # one sector changes: nothing to tear
        assert list(Generator(timeline([write(0, one), barrier((0, PAGE))]), "t").generate("torn")) == []
        assert list(Generator(timeline([write(0, A), barrier((0, PAGE))], sector=4096), "t").generate("torn")) == []
        tl = timeline([write(0, A), barrier((0, PAGE))], sector=2048)
        assert images(tl, list(Generator(tl, "t").generate("torn"))) == {A[:2048] + bytes(2048 + 3 * PAGE),
                                                                         bytes(2048) + A[2048:] + bytes(3 * PAGE)}

    def test_sector_sizes_outside_512_to_4096_are_refused(self) -> None:
        with pytest.raises(ValueError):
            timeline([], sector=256)


class TestKeys:
    def test_equal_keys_exactly_when_equal_files(self) -> None:
        tl = timeline([write(0, A), write(PAGE, bytes(PAGE)), write(2 * PAGE, A), write(0, bytes(PAGE)),
                       barrier((0, 3 * PAGE)), Entry("resize", IMAGE, size=5 * PAGE), barrier((0, 1))])
        gen = Generator(tl, "t")
        specs = [s for strategy in ("prefix", "barrier", "subset", "versions", "torn") for s in gen.generate(strategy)]
        by_key: dict[object, bytes] = {}
        by_content: dict[bytes, object] = {}
        for s in specs:
            k, data = tl.key(s), tl.materialize(s)[IMAGE]
            assert by_key.setdefault(k, data) == data
            assert by_content.setdefault(data, k) == k
        assert len(by_key) < len(specs)                # writes of zeros over zeros change nothing
