"""The ring that holds released sessions' KV in host memory: entries keep their bytes until the
head comes round to them, the oldest go first, and its pages are mapped ahead of the head."""

import ctypes
import os
import sys

import pytest

from specserve.runtime.ring import AHEAD, Ring

PAGE = 4096


def _write(address: int, data: bytes) -> None:
    ctypes.memmove(address, data, len(data))


def _read(ring: Ring, name: str) -> bytes:
    address, size = ring.address(name)
    return ctypes.string_at(address, size)


def test_entries_keep_their_bytes_until_the_head_wraps_over_them():
    ring = Ring(10 * PAGE)
    for name, fill in (("a", b"a"), ("b", b"b"), ("c", b"c")):
        address, evicted = ring.put(name, 3 * PAGE)
        assert evicted == []
        _write(address, fill * (3 * PAGE))
    address, evicted = ring.put("d", 2 * PAGE)  # 9 of 10 pages used: "d" starts over, on "a"
    assert evicted == ["a"] and ring.address("d")[0] == ring.base
    _write(address, b"d" * (2 * PAGE))
    assert [_read(ring, n) for n in ("b", "c", "d")] == [b"b" * (3 * PAGE), b"c" * (3 * PAGE), b"d" * (2 * PAGE)]
    _, evicted = ring.put("e", 5 * PAGE)  # pages 2-6: over "b" (3-5) and the start of "c" (6-8)
    assert evicted == ["b", "c"] and list(ring.entries) == ["d", "e"] and ring.used == 7 * PAGE
    ring.drop("d")
    assert list(ring.entries) == ["e"]
    with pytest.raises(ValueError, match="does not fit"):
        ring.put("f", 11 * PAGE)
    ring.close()


def _kernel_populates() -> bool:
    version = tuple(int(p) for p in os.uname().release.split("-")[0].split(".")[:2])
    return sys.platform.startswith("linux") and version >= (5, 14)


@pytest.mark.skipif(not _kernel_populates(), reason="MADV_POPULATE_WRITE came with Linux 5.14")
def test_pages_are_mapped_ahead_of_the_head_and_no_further():
    ring = Ring(64 * PAGE)
    assert ring.mapped == 0  # nothing is mapped before the first entry
    ring.put("a", 2 * PAGE)
    assert ring.wait_mapped((2 + AHEAD * 2) * PAGE, timeout=10)
    assert ring.mapped == (2 + AHEAD * 2) * PAGE < ring.capacity
    ring.close()
