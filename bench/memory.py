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


class TreeSampler:
    """Peak resident memory of a process and all its descendants (e.g. `forge data` and its tokenizing
    workers), summed over the processes and sampled every `interval` seconds from /proc.

    Reports the peak of the summed VmRSS and, separately, of the summed RssAnon (memory the processes
    allocated, as opposed to file pages they map: shared libraries and memory-mapped data, which the
    kernel can drop and which several processes may share, so summed RSS over-counts them)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        import threading

        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_anon = 0
        self.processes_seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = anon = 0
            for p in tree:
                fields = _read_status(p.pid)
                rss += fields.get("VmRSS", 0)
                anon += fields.get("RssAnon", 0)
                self.processes_seen.add(p.pid)
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
            self._stop.wait(self.interval)


def _read_status(pid: int) -> dict[str, int]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in lines)
            if k in ("VmRSS", "RssAnon", "RssFile")}
