"""What the benchmark scripts share: progress logging and reading /proc."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def proc_field(path: str, name: str) -> str | None:
    """The value of `name:` in a /proc file such as /proc/meminfo or /proc/cpuinfo."""
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    return None


def proc_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of process `pid` so far, or None if it is not on this host."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None
