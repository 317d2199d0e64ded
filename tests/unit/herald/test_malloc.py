"""keep_freed_memory: freeing and reallocating MiB buffers stops costing page faults."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import resource, sys
from herald.malloc import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
def churn():
    for i in range(300):
        b = bytearray(b"x" * (1 << 20))  # a fetch-sized buffer, written, then freed
        del b
churn()  # warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True
    )
    return int(out.stdout)


def test_freed_buffers_are_reused_without_page_faults() -> None:
    default, tuned = faults("default"), faults("tuned")
    # 300 x 1 MiB: by default every buffer is fresh mmapped memory (~256 faults each)
    assert default > 300 * 100, default
    assert tuned < default / 20, (tuned, default)
