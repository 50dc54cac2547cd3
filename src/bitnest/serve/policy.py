"""Precision by load: which precision serves requests that do not name one.

`fixed`: always the checkpoint's own (widest) precision.

`adaptive`: a ladder of precisions, widest first. By default ("auto") it is measured at start-up: the parent and
every narrower candidate (int4, int3, int2) is timed on a decode step of half the batch limit, and a rung is kept
only when it is at least 10 % faster than the last kept one (`measured_ladder`); `--ladder 8,4,2` fixes it. Every tick the
engine reports three signals; the controller steps **down** one rung when any is over its limit and **up** one
rung when all are well under, with hysteresis so it does not flap:

  signal                                   over (step down)           well under (step up)
  queue: requests waiting + running        > max_queue                ≤ max_queue / 2
  latency: p90 time to first token over    > slo_ms                   < slo_ms / 2
    the last `window_s` seconds
  memory: process RSS                      > max_memory               < 0.9 · max_memory

A step down needs `down_hold_s` since the last change, a step up `up_hold_s` (longer: raising precision under
load that has only just receded would bounce straight back). Every change is logged (logger `bitnest.serve`)
and kept in `changes` (served at /v1/precision and counted in /metrics). A request served at a precision is
finished at that precision: a change applies to requests admitted after it.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from .precision import Precision

log = logging.getLogger("bitnest.serve")
KEEP = 1000  # change events kept for /v1/precision


@dataclass
class Signals:
    queue: int            # waiting + running requests
    ttft_p90_ms: float    # over the window; 0 when no request started in it
    rss_bytes: int


@dataclass
class Adaptive:
    ladder: list[Precision]         # widest first
    step_ms: dict = field(default_factory=dict)  # measured decode step per candidate (ladder "auto")
    max_queue: int = 8
    slo_ms: float | None = None
    max_memory: int | None = None   # bytes
    down_hold_s: float = 1.0
    up_hold_s: float = 5.0
    window_s: float = 10.0
    level: int = 0
    changes: list[dict] = field(default_factory=list)  # the latest KEEP changes (a long-running server stays bounded)
    n_changes: int = 0
    _last_change: float = field(default=float("-inf"))
    _ttft: deque = field(default_factory=deque)  # (t, seconds)

    name = "adaptive"

    @property
    def current(self) -> Precision:
        return self.ladder[self.level]

    def observe_ttft(self, seconds: float, now: float | None = None) -> None:
        self._ttft.append((time.monotonic() if now is None else now, seconds))

    def ttft_p90_ms(self, now: float) -> float:
        while self._ttft and self._ttft[0][0] < now - self.window_s:
            self._ttft.popleft()
        if not self._ttft:
            return 0.0
        xs = sorted(s for _, s in self._ttft)
        return 1e3 * xs[min(len(xs) - 1, int(0.9 * len(xs)))]

    def _reasons(self, s: Signals) -> tuple[list[str], bool]:
        over, under = [], True
        if s.queue > self.max_queue:
            over.append(f"queue {s.queue} > {self.max_queue}")
        under &= s.queue <= self.max_queue // 2
        if self.slo_ms is not None:
            if s.ttft_p90_ms > self.slo_ms:
                over.append(f"p90 TTFT {s.ttft_p90_ms:.0f} ms > {self.slo_ms:g} ms")
            under &= s.ttft_p90_ms < self.slo_ms / 2
        if self.max_memory is not None:
            if s.rss_bytes > self.max_memory:
                over.append(f"RSS {s.rss_bytes / 2**20:.0f} MiB > {self.max_memory / 2**20:.0f} MiB")
            under &= s.rss_bytes < 0.9 * self.max_memory
        return over, under

    def tick(self, s: Signals, now: float | None = None) -> Precision | None:
        """Apply the rule; returns the new precision when it changed."""
        now = time.monotonic() if now is None else now
        over, under = self._reasons(s)
        old = self.level
        if over and self.level < len(self.ladder) - 1 and now - self._last_change >= self.down_hold_s:
            self.level += 1
            why = "; ".join(over)
        elif not over and under and self.level > 0 and now - self._last_change >= self.up_hold_s:
            self.level -= 1
            why = f"room: queue {s.queue}" + (f", p90 TTFT {s.ttft_p90_ms:.0f} ms" if self.slo_ms else "")
        else:
            return None
        self._last_change = now
        ev = {"time": time.time(), "from": self.ladder[old].label, "to": self.current.label, "reason": why}
        self.changes.append(ev)
        self.n_changes += 1
        del self.changes[:-KEEP]
        log.warning("bitnest serve: precision %s → %s (%s)", ev["from"], ev["to"], why)
        return self.current


def measured_ladder(candidates: list[Precision], seconds: dict[str, float], gain: float = 0.9) -> list[Precision]:
    """The rungs worth stepping down to: from the widest candidate, each next one only if its measured decode step
    is below `gain` × the last kept rung's. Lower precision buys latency only where it is faster: on a CPU a 10M
    model is overhead-bound (int4 no faster than int8) and batched int2 kernels can be slower than int4's."""
    out = [candidates[0]]
    for p in candidates[1:]:
        if seconds[p.label] < gain * seconds[out[-1].label]:
            out.append(p)
    return out


@dataclass
class Fixed:
    own: Precision
    changes: list[dict] = field(default_factory=list)
    n_changes: int = 0
    name = "fixed"

    @property
    def current(self) -> Precision:
        return self.own

    def observe_ttft(self, seconds: float, now: float | None = None) -> None:
        pass

    def ttft_p90_ms(self, now: float) -> float:
        return 0.0

    def tick(self, s: Signals, now: float | None = None) -> None:
        return None
