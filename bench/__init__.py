"""Benchmarks: qjournal against its peer (qemu-img) on the same data, in one run.

    python -m bench                  # every benchmark, 5 rounds
    python -m bench bitmap --rounds 9 --json results.json
    python -m bench --list

Each benchmark pairs a library call ("ours", timed in-process with
``time.perf_counter``, interpreter start not counted) with a command ("peer",
timed as a whole process, start to exit). Every round both sides get their own
fresh copy of the same template image; the order of the two alternates from one
round to the next. The table gives each side's median, the ratio ours/peer and
the goal that ratio must meet.

Adding a benchmark is one class in a module of this package (one module per
area: ``bitmaps.py``, ``io.py``, ``checkbench.py``, ``checksum.py``, ``crashsim.py``);
every module here is imported on start, so nothing else needs registering::

    from .harness import Benchmark, Fixtures, benchmark

    @benchmark("bitmap-add", goal=1.0)
    class BitmapAdd(Benchmark):
        \"\"\"qemu-img bitmap --add, 64 KiB granularity, on an empty 16 TiB image.\"\"\"

        def template(self, fx: Fixtures) -> Path:
            return fx.image("empty-16T", build_empty)

        def ours(self, image: Path) -> None:
            with qjournal.open(image, "r+") as img:
                img.bitmaps.add("b0", granularity=65536)

        def peer(self, image: Path) -> list[str]:
            return ["qemu-img", "bitmap", "--add", "-g", "65536", str(image), "b0"]

A benchmark whose goal is a throughput rather than a peer program is declared with
``rate`` (bytes/s) and ``nbytes`` (bytes one ``ours`` call processes), and has no
``peer``: ``@benchmark("crc32c-whole", rate=4e9, nbytes=64 << 20)``. Its peer column
is the time the rate allows, so its ratio is at most 1.0 exactly when the rate is met.
"""
from .harness import Benchmark, Fixtures, benchmark

__all__ = ["Benchmark", "Fixtures", "benchmark"]
