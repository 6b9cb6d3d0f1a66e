"""Progress of long work, for a person at a terminal and for a log file: the one helper behind
training, the token cache and sampling.

At a terminal (stderr is a tty) it is a tqdm bar.  Anywhere else (a SLURM `.out`, Hydra's job
log, a pipe) the bar would be redrawn into the file, so it writes `logging` lines instead, from
logger "d2c.progress", every D2C_LOG_EVERY seconds (default 60; 0: every update), plus the first
and the last:

    train mar (mar_small): 120/1000 steps (12%) | epoch 2 loss 0.4123 lr 1.0e-04 | 38.2 img/s | ETA 0:09:05

TQDM_DISABLE=1 turns the bar off and leaves the lines.
"""
from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("d2c.progress")


def setup_logging(force: bool = False) -> None:
    """The commands' log (d2c-sample, d2c-evaluate, run.py --cache-only / --train-only): INFO
    lines with their time on stdout, where SLURM's .out collects them; a configured root logger
    (Hydra's job log, an application's own) is left as it is unless `force`."""
    if force or not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%m-%d %H:%M:%S",
                            stream=sys.stdout, force=True)
    logging.captureWarnings(True)


def log_every() -> float:
    """Seconds between progress lines in a log: D2C_LOG_EVERY, default 60."""
    raw = os.environ.get("D2C_LOG_EVERY", "60")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"D2C_LOG_EVERY={raw!r}; allowed: seconds >= 0") from None
    if not value >= 0:
        raise ValueError(f"D2C_LOG_EVERY={raw!r}; allowed: seconds >= 0")
    return value


def on_terminal() -> bool:
    return sys.stderr.isatty() and os.environ.get("TQDM_DISABLE", "") in ("", "0")


def hms(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.1e}" if v and (abs(v) < 1e-3 or abs(v) >= 1e5) else f"{v:.4g}"
    return str(v)


class Progress:
    """`total` units of work (steps, images, shards) starting at `initial` (a resumed run).
    `images_per_unit` turns the rate into img/s (a training step of batch B: B images).
    update(n, **fields): n more units done; fields (loss=, lr=, epoch=) join the next line.
    enabled=False: silent; bar=False: never a bar, the log lines still go to a log."""

    def __init__(self, desc: str, total: int, unit: str = "it", *, enabled: bool = True, initial: int = 0,
                 images_per_unit: float | None = None, bar: bool = True):
        self.desc, self.total, self.unit, self.done = desc, int(total), unit, int(initial)
        self.images_per_unit = images_per_unit
        self.fields: dict = {}
        self.bar = None
        self.logging = False
        if enabled and bar and on_terminal():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit, dynamic_ncols=True)
        elif enabled and not on_terminal():
            self.logging, self.every = True, log_every()
        self.t0 = self.last = time.perf_counter()
        self.start = self.done
        if self.logging:
            log.info(self.line(first=True))

    def rate(self) -> float:
        """Units a second since this run started (not counting the units it resumed from)."""
        return (self.done - self.start) / max(time.perf_counter() - self.t0, 1e-9)

    def line(self, first: bool = False) -> str:
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.desc}: {self.done}/{self.total} {self.unit}{pct}"]
        if self.fields:
            parts.append(" ".join(f"{k} {_fmt(v)}" for k, v in self.fields.items()))
        if not first:
            r = self.rate()
            parts.append(f"{r * self.images_per_unit:.1f} img/s" if self.images_per_unit else
                         f"{r:.2f} {self.unit}/s")
            left = (self.total - self.done) / r if r > 0 else float("inf")
            parts.append(f"elapsed {hms(time.perf_counter() - self.t0)}"
                         + (f" ETA {hms(left)}" if self.done < self.total and left != float("inf") else ""))
        return " | ".join(parts)

    def due(self, n: int = 1) -> bool:
        """Whether update(n) will write a log line (so a caller fetches its fields only then)."""
        return self.logging and (time.perf_counter() - self.last >= self.every or self.done + n >= self.total)

    def update(self, n: int = 1, **fields) -> None:
        self.done += n
        self.fields.update(fields)
        if self.bar is not None:
            if fields:
                self.bar.set_postfix({k: _fmt(v) for k, v in self.fields.items()}, refresh=False)
            self.bar.update(n)
        elif self.logging:
            now = time.perf_counter()
            if now - self.last >= self.every or self.done >= self.total:
                self.last = now
                log.info(self.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
