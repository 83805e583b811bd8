"""Peak-RSS measurement for the benchmarks (Linux).

Not getrusage: on Linux its ru_maxrss survives fork+exec, so a child inherits its parent's peak.
VmHWM in /proc/self/status belongs to the address space (new at exec), and writing 5 to
/proc/self/clear_refs resets it to the current RSS, so a phase's own peak can be measured.
"""

from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return _status("VmRSS")


def peak_rss_bytes() -> int:
    return _status("VmHWM")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")
