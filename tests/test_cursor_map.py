"""The data position a replacement worker reads (``CursorMap``): the newest whole record,
even when its predecessor was killed between two stores of a step's write. The restart
itself, with real processes, is in tests/test_recipe.py (every sample seen once)."""

from __future__ import annotations

import struct

from tessera.cluster.lives import CursorMap


def test_a_replacement_reads_the_last_step_its_predecessor_wrote(tmp_path):
    path = tmp_path / "worker-0.cursor"
    first = CursorMap(path, fresh=True)
    assert first.load() is None  # no step completed
    for clock in range(1, 6):
        first.save(clock, [(0, 16 * clock), (2, clock)])
    # killed (nothing closed): the replacement maps the same file
    second = CursorMap(path, fresh=False)
    assert second.load() == (5, [(0, 80), (2, 5)])
    second.save(6, [(1, 0), (2, 6)])  # and writes on from there, into the older record
    assert CursorMap(path, fresh=False).load() == (6, [(1, 0), (2, 6)])
    assert CursorMap(path, fresh=True).load() is None  # a new job starts it anew


def test_a_record_torn_by_a_kill_is_passed_over_for_the_step_before(tmp_path):
    path = tmp_path / "worker-1.cursor"
    cursors = CursorMap(path, fresh=True)
    cursors.save(7, [(3, 224)])
    cursors.save(8, [(3, 256)])
    # A kill after the record of clock 9 began but before its closing version was stored:
    # replay the first stores of save(9) by hand.
    version = 3
    at = (version % 2) * CursorMap._RECORD
    struct.pack_into("<qqq", cursors._map, at, version, 9, 1)
    struct.pack_into("<qq", cursors._map, at + 24, 3, 288)
    replacement = CursorMap(path, fresh=False)
    assert replacement.load() == (8, [(3, 256)])
    # The replacement writes its next step over the torn record, never over clock 8's (the
    # torn record's version, 3, is the highest: a write after it would have gone there).
    replacement.save(9, [(3, 288)])
    assert struct.unpack_from("<qq", replacement._map, 0) == (2, 8)  # clock 8's, whole
    assert CursorMap(path, fresh=False).load() == (9, [(3, 288)])
