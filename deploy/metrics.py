"""Per-tick records of the control loop and their summary (what a run reports and writes to JSON)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from data.io import atomic_file
from deploy.safety import LIMIT_EVENTS, WATCHDOG_STATES


@dataclasses.dataclass
class TickRecord:
    """One control tick: its deadline (monotonic s), how late it woke (s), deadlines skipped before it, the age of
    the newest observation (s, inf if none), the watchdog state and the limit event of its command (or None)."""

    deadline: float
    lateness_s: float
    skipped: int
    obs_age_s: float
    state: str
    limit_event: str | None


def percentiles_ms(values: list[float], qs: tuple[float, ...]) -> dict[str, float | None]:
    finite = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    names = {50.0: "p50", 99.0: "p99", 99.9: "p99.9"}
    if not len(finite):
        return {names[q]: None for q in qs}
    return {names[q]: float(np.percentile(finite, q) * 1e3) for q in qs}


class LoopMetrics:
    """Collects ``TickRecord``s and the inference latency of every chunk received."""

    def __init__(self) -> None:
        self.ticks: list[TickRecord] = []
        self.inference_s: list[float] = []
        self.dropped_actions = 0
        self.extra: dict[str, Any] = {}

    def record_tick(self, record: TickRecord) -> None:
        self.ticks.append(record)

    def record_chunk(self, inference_s: float, dropped: int) -> None:
        self.inference_s.append(float(inference_s))
        self.dropped_actions += int(dropped)

    def summary(self) -> dict[str, Any]:
        """Lateness p50/p99/p99.9 (ms), missed (skipped) ticks, inference and observation-age p50/p99 (ms), ticks
        per watchdog state, limit events, dropped actions, plus whatever the loop put in ``extra``."""
        lateness = [r.lateness_s for r in self.ticks]
        states = [r.state for r in self.ticks]
        events = [r.limit_event for r in self.ticks]
        return {
            "ticks": len(self.ticks),
            "missed_ticks": int(sum(r.skipped for r in self.ticks)),
            "lateness_ms": percentiles_ms(lateness, (50.0, 99.0, 99.9)),
            "lateness_max_ms": float(max(lateness) * 1e3) if lateness else None,
            "inference_ms": percentiles_ms(self.inference_s, (50.0, 99.0)),
            "chunks": len(self.inference_s),
            "obs_age_ms": percentiles_ms([r.obs_age_s for r in self.ticks], (50.0, 99.0)),
            "watchdog_ticks": {s: states.count(s) for s in WATCHDOG_STATES},
            "limit_events": {e: events.count(e) for e in LIMIT_EVENTS},
            "dropped_actions": self.dropped_actions,
            **self.extra,
        }

    def write_json(self, path: str | os.PathLike) -> None:
        """Write the summary and every tick record to ``path`` atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "summary": self.summary(),
            # Strict JSON has no Infinity/NaN: a non-finite number (e.g. an observation age before any) becomes null.
            "ticks": [
                {
                    k: None if isinstance(v, float) and not math.isfinite(v) else v
                    for k, v in dataclasses.asdict(r).items()
                }
                for r in self.ticks
            ],
            "inference_s": self.inference_s,
        }
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(payload, allow_nan=False))
