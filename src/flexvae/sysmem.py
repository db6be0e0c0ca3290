"""How much RAM this process can still allocate: MemAvailable, within any cgroup limit."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from .errors import FlexVAEError


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (containers), or None without a limit."""
    try:
        with open("/proc/self/cgroup") as fh:
            groups = [line.strip().split(":", 2) for line in fh if line.count(":") >= 2]
    except OSError:
        return None
    files = []
    for _, controllers, path in groups:
        path = path.lstrip("/")
        if controllers == "":
            files += [(f"/sys/fs/cgroup/{p}/memory.max", f"/sys/fs/cgroup/{p}/memory.current") for p in (path, "")]
        elif "memory" in controllers.split(","):
            files += [(f"/sys/fs/cgroup/memory/{p}/memory.limit_in_bytes",
                       f"/sys/fs/cgroup/memory/{p}/memory.usage_in_bytes") for p in (path, "")]
    for limit_file, usage_file in files:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            return max(0, int(limit) - usage)
    return None


def available_memory() -> int:
    """Bytes of RAM that new allocations can still get (MemAvailable, within any cgroup limit)."""
    available = None
    with contextlib.suppress(OSError, AttributeError):
        with open("/proc/meminfo") as fh:
            available = int(re.search(r"^MemAvailable:\s+(\d+) kB", fh.read(), re.M).group(1)) * 1024
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            raise FlexVAEError("cannot tell how much memory is free on this machine") from None
    room = _cgroup_room()
    return available if room is None else min(available, room)
