"""node.heap: with `retain_freed_memory`, memory a process frees stays resident for reuse; without it glibc hands a
large freed block straight back. Each case runs in a fresh interpreter (the setting is process-wide)."""

from __future__ import annotations

import subprocess
import sys

from node.heap import retain_freed_memory

_PROBE = """
import sys
from node.heap import release_beyond, retain_freed_memory
applied = retain_freed_memory(int(sys.argv[1]))
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
before = rss_mb()
block = bytearray(48 << 20)  # 48 MiB, touched (bytearray zero-fills)
del block
kept = round(rss_mb() - before)
released = [release_beyond(mb) for mb in map(int, sys.argv[2:])]
print(applied, kept, round(rss_mb() - before), *released)
"""


def _probe(mb: int, *release: int) -> tuple[bool, int, int, list[bool]]:
    """(applied, MiB still resident after the free, MiB resident after `release_beyond` with each of ``release``,
    what each call returned)."""
    out = subprocess.run([sys.executable, "-c", _PROBE, str(mb), *map(str, release)], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2]), [v == "True" for v in out[3:]]


def test_freed_memory_stays_with_retain_and_goes_back_without() -> None:
    applied, kept, _, _ = _probe(1024)
    assert applied
    assert kept >= 40  # the 48 MiB block stays resident for the next allocation
    applied, kept, _, _ = _probe(0)
    assert not applied
    assert kept < 8  # glibc's default: a block that large is unmapped when freed


def test_release_beyond_hands_back_only_past_its_bound() -> None:
    """48 MiB lie free: a 64 MiB bound keeps them, a 16 MiB bound hands them back."""
    _, kept, after, released = _probe(1024, 64)
    assert released == [False] and after >= 40
    _, kept, after, released = _probe(1024, 64, 16)
    assert kept >= 40 and released == [False, True] and after < 8


def test_zero_or_less_leaves_the_defaults() -> None:
    assert retain_freed_memory(0) is False
    assert retain_freed_memory(-5) is False
