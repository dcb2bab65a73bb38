"""Download progress: a log line per file every DOWNLOAD_PROGRESS_INTERVAL seconds (RunPod's logs are
line-based: percent, MB/s, ETA), or tqdm bars on a terminal."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm

from comfy_worker.provision.download_options import DownloadOptions

log = logging.getLogger(__name__)


class FileProgress:
    """Bytes of one file, counted from the transfer threads."""

    def __init__(self, name: str, total: int | None, bar: tqdm[None] | None) -> None:
        self.name, self.total, self.bar = name, total, bar
        self._lock = threading.Lock()
        self.done = self.baseline = 0
        self.started = time.monotonic()

    def add(self, count: int) -> None:
        with self._lock:
            self.done += count
        if self.bar is not None:
            self.bar.update(count)

    def resume(self, position: int) -> None:
        with self._lock:
            self.done = self.baseline = position
            self.started = time.monotonic()
        if self.bar is not None:
            self.bar.reset(self.total)
            self.bar.update(position)

    def rate(self) -> float:
        return (self.done - self.baseline) / max(time.monotonic() - self.started, 1e-6)

    def line(self) -> str:
        rate = self.rate()
        if self.total:
            eta = f"{(self.total - self.done) / rate:.0f} s" if rate > 0 else "?"
            return (
                f"{self.name}: {100 * self.done / self.total:5.1f}% of {mb(self.total)}, "
                f"{rate / 1e6:.1f} MB/s, ETA {eta}"
            )
        return f"{self.name}: {mb(self.done)}, {rate / 1e6:.1f} MB/s"


class Board:
    """The files in flight: a thread logs a line per file every interval; on a TTY, tqdm bars instead."""

    def __init__(self, options: DownloadOptions) -> None:
        self.interval = options.progress_interval_s
        self.on_progress = options.on_progress
        self.bars = sys.stderr.isatty() if options.progress_bar is None else options.progress_bar
        self.active: list[FileProgress] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._report, name="download-progress", daemon=True)

    def __enter__(self) -> Board:
        if not self.bars:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @contextmanager
    def track(self, name: str, total: int | None) -> Iterator[FileProgress]:
        bar = tqdm(total=total, desc=name, unit="B", unit_scale=True, leave=True) if self.bars else None
        progress = FileProgress(name, total, bar)
        with self._lock:
            self.active.append(progress)
        try:
            yield progress
        finally:
            with self._lock:
                self.active.remove(progress)
            if bar is not None:
                bar.close()

    def _report(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                lines = [p.line() for p in self.active]
                counts = [(p.name, p.done, p.total) for p in self.active]
            for line in lines:
                log.info("%s", line)
            if self.on_progress is not None:
                for name, done, total in counts:
                    self.on_progress(name, done, total)


def mb(size: int | None) -> str:
    if size is None:
        return "? MB"
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
