"""A hypothesis state machine: bitmap operations through the library against a plain model.

Each step runs one operation with qjournal (or a guest write with qemu-io, which dirties
the enabled bitmaps), then compares qjournal's view with the model; every few steps
qemu-img check and qemu-img info re-check the image, and qemu-nbd the bits. Each
qjournal operation runs in an explicit transaction, so that the allocator's invariants
(``_check``) are asserted after it, before the commit.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import qemu
import qjournal
from profiles import examples
from test_guest_model import check_staged

DISK = 64 << 20
NAMES = st.sampled_from(["a", "b", "c", "long-" + "n" * 40])
GRANS = st.sampled_from([512, 4096, 65536, 1 << 20])


def granules(start: int, length: int, g: int) -> set[int]:
    return set(range(start // g, (start + length - 1) // g + 1))


def extents(bits: set[int], g: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for b in sorted(bits):
        s, n = b * g, min(g, DISK - b * g)
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((s, n))
    return out


def in_transaction(path: Path, op: Callable[[Any], None]) -> None:
    """Run ``op(img)`` in an explicit transaction and check the staged state before the commit."""
    with qjournal.open(path, "r+") as img:
        with img.transaction() as tx:
            op(img)
            check_staged(tx)


class BitmapMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="qj-model-"))
        self.path = qemu.create(self.dir / "m.qcow2", str(DISK), "cluster_size=4096")
        self.model: dict[str, dict] = {}
        self.steps = 0

    @rule(name=NAMES, g=GRANS, disabled=st.booleans())
    def add(self, name: str, g: int, disabled: bool) -> None:
        if name in self.model:
            try:
                in_transaction(self.path, lambda img: img.bitmaps.add(name, g, disabled=disabled))
            except qjournal.BitmapError:
                return
            raise AssertionError("duplicate add accepted")
        in_transaction(self.path, lambda img: img.bitmaps.add(name, g, disabled=disabled))
        self.model[name] = {"g": g, "enabled": not disabled, "bits": set()}

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.model)))
        in_transaction(self.path, lambda img: img.bitmaps.remove(name))
        del self.model[name]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def clear(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.model)))
        in_transaction(self.path, lambda img: img.bitmaps.clear(name))
        self.model[name]["bits"] = set()

    @precondition(lambda self: self.model)
    @rule(data=st.data(), enable=st.booleans())
    def toggle(self, data: st.DataObject, enable: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.model)))
        in_transaction(self.path, lambda img: (img.bitmaps.enable if enable else img.bitmaps.disable)(name))
        self.model[name]["enabled"] = enable

    @precondition(lambda self: len(self.model) >= 2)
    @rule(data=st.data())
    def merge(self, data: st.DataObject) -> None:
        dst, src = data.draw(st.permutations(sorted(self.model)))[:2]
        in_transaction(self.path, lambda img: img.bitmaps.merge(dst, src))
        gd, gs = self.model[dst]["g"], self.model[src]["g"]
        for b in self.model[src]["bits"]:
            self.model[dst]["bits"] |= granules(b * gs, min(gs, DISK - b * gs), gd)

    @precondition(lambda self: len(self.model) >= 2)
    @rule(data=st.data())
    def several_in_one_transaction(self, data: st.DataObject) -> None:
        a, b = data.draw(st.permutations(sorted(self.model)))[:2]
        with qjournal.open(self.path, "r+") as img:
            with img.transaction() as tx:
                img.bitmaps.clear(a)
                check_staged(tx)
                img.bitmaps.disable(b)
                check_staged(tx)
        self.model[a]["bits"] = set()
        self.model[b]["enabled"] = False

    @rule(start=st.integers(0, DISK - 1), length=st.integers(1, 3 << 20))
    def guest_write(self, start: int, length: int) -> None:
        length = min(length, DISK - start)
        qemu.qemu_io(self.path, f"write {start} {length}")
        for m in self.model.values():
            if m["enabled"]:
                m["bits"] |= granules(start, length, m["g"])

    @invariant()
    def agrees_with_model(self) -> None:
        with qjournal.open(self.path) as img:
            assert list(img.bitmaps) == list(self.model)
            for name, m in self.model.items():
                b = img.bitmaps[name]
                assert b.granularity == m["g"] and b.enabled == m["enabled"]
                assert list(b.dirty_extents()) == extents(m["bits"], m["g"])
        self.steps += 1
        if self.steps % 4 == 0:
            qemu.assert_clean(self.path)
            got = {b["name"]: b for b in qemu.bitmaps(self.path)}
            assert list(got) == list(self.model)
            for name, m in self.model.items():
                assert got[name]["granularity"] == m["g"]
                assert got[name]["flags"] == (["auto"] if m["enabled"] else [])

    def teardown(self) -> None:
        try:
            qemu.assert_clean(self.path)
            for name, m in self.model.items():
                assert qemu.nbd_dirty_extents(self.path, name) == extents(m["bits"], m["g"])
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


BitmapMachine.TestCase.settings = settings(max_examples=examples(12), stateful_step_count=10)
TestBitmapModel = BitmapMachine.TestCase
