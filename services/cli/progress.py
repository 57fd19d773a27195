"""Progress of a long command: a tqdm bar when stderr is a terminal, otherwise a log line after the first
step and then every `every_s` seconds; both with the rates (e.g. images/s and captions/s). The closing
line (`done`) always carries the totals and rates."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

EVERY_S = 30.0


class Progress:
    """Counts `unit` (the bar's unit, e.g. images) and `also` (e.g. captions) as work is done."""

    def __init__(self, log: logging.Logger, desc: str, unit: str, also: str, total: int | None = None,
                 every_s: float = EVERY_S) -> None:
        self.log, self.unit, self.also, self.total, self.every_s = log, unit, also, total, every_s
        self.n = self.n_also = 0
        self.t0 = self.last = time.perf_counter()
        self.logged = False
        self.bar = tqdm(total=total, desc=desc, unit=unit[:-1] if unit.endswith("s") else unit, dynamic_ncols=True,
                        file=sys.stderr) if sys.stderr.isatty() else None

    def update(self, n: int, n_also: int) -> None:
        self.n += n
        self.n_also += n_also
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(f"{self.n_also / max(now - self.t0, 1e-9):.1f} {self.also}/s", refresh=False)
        elif not self.logged or now - self.last >= self.every_s:
            self.last, self.logged = now, True
            self.log.info("progress", extra={**self.rates(now), **({"of": self.total} if self.total else {})})

    def rates(self, now: float | None = None) -> dict:
        seconds = max((now or time.perf_counter()) - self.t0, 1e-9)
        return {self.unit: self.n, self.also: self.n_also, "seconds": round(seconds, 2),
                f"{self.unit}_per_s": round(self.n / seconds, 2), f"{self.also}_per_s": round(self.n_also / seconds, 2)}

    def close(self, **extra) -> None:
        if self.bar is not None:
            self.bar.close()
        self.log.info("done", extra={**self.rates(), **extra})
