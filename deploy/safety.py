"""Command limits and the watchdog of the control loop.

Velocity is bounded with the *measured* time since the previous command, not the nominal tick: after a late tick a
nominal-tick bound lets the commanded velocity reach several times the limit (measured: 5x; see
shared/notes/ros2-over-dds.md, "Real-time loop facts").
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

RUN, HOLD, ESTOP = "RUN", "HOLD", "ESTOP"
WATCHDOG_STATES = (RUN, HOLD, ESTOP)
LIMIT_EVENTS = ("rejected", "clamped_position", "clamped_velocity")


def _as_vector(name: str, value: float | list[float] | np.ndarray | None) -> np.ndarray | None:
    if value is None:
        return None
    vector = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if vector.ndim != 1 or not np.all(np.isfinite(vector)):
        raise ValueError(f"{name} must be a finite number or 1-d list of numbers, got {value!r}")
    return vector


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on commanded position targets ``[Da]`` (raw action units); a scalar applies to every dimension.

    ``low``/``high``: the position box; ``workspace_low``/``workspace_high``: a second box (e.g. the table area of a
    Cartesian target), both optional and intersected; ``max_velocity``: units per second; ``reject_margin``: targets
    outside the box by more than this (or NaN/inf) are rejected and the previous command is kept."""

    low: float | list[float] | None = None
    high: float | list[float] | None = None
    max_velocity: float | list[float] | None = None
    workspace_low: float | list[float] | None = None
    workspace_high: float | list[float] | None = None
    reject_margin: float = math.inf

    def __post_init__(self) -> None:
        for name in ("low", "high", "max_velocity", "workspace_low", "workspace_high"):
            _as_vector(name, getattr(self, name))
        if self.max_velocity is not None and np.any(_as_vector("max_velocity", self.max_velocity) <= 0):
            raise ValueError(f"max_velocity must be > 0, got {self.max_velocity!r}")
        if not self.reject_margin >= 0:
            raise ValueError(f"reject_margin must be >= 0, got {self.reject_margin!r}")
        low, high = self.box()
        if np.any(low > high):
            raise ValueError(
                f"lower bounds must not exceed upper bounds, got low={self.low!r} high={self.high!r} "
                f"workspace_low={self.workspace_low!r} workspace_high={self.workspace_high!r}"
            )

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """The intersection of the position and workspace boxes as ``(low, high)`` (±inf where unbounded)."""
        low, high = np.array([-np.inf]), np.array([np.inf])
        for bound in (self.low, self.workspace_low):
            if bound is not None:
                low = np.maximum(low, _as_vector("low", bound))
        for bound in (self.high, self.workspace_high):
            if bound is not None:
                high = np.minimum(high, _as_vector("high", bound))
        return low, high

    def apply(
        self, target: np.ndarray, previous: np.ndarray | None, elapsed_s: float
    ) -> tuple[np.ndarray | None, str | None]:
        """``target [Da]`` -> ``(command [Da], event)``: the target clamped into the box and to ``max_velocity *
        elapsed_s`` away from ``previous`` (the last command, sent ``elapsed_s`` measured seconds ago; None for the
        first command, which is then only boxed). A rejected target returns ``previous`` (None if there is none)
        with event "rejected"; otherwise the event is "clamped_position", "clamped_velocity" or None."""
        target = np.asarray(target, dtype=np.float64)
        low, high = self.box()
        outside = np.maximum(low - target, target - high)  # > 0 where out of the box
        if not np.all(np.isfinite(target)) or np.any(outside > self.reject_margin):
            return (None if previous is None else np.array(previous, dtype=np.float64)), "rejected"
        command = np.clip(target, low, high)
        event = "clamped_position" if np.any(command != target) else None
        if previous is not None and self.max_velocity is not None:
            step = _as_vector("max_velocity", self.max_velocity) * max(elapsed_s, 0.0)
            limited = np.clip(command, previous - step, previous + step)
            if np.any(limited != command):
                command, event = limited, "clamped_velocity"
        return command, event


class Watchdog:
    """RUN -> HOLD when the observation is older than ``obs_timeout_s`` or the action queue has been exhausted for
    longer than ``chunk_timeout_s``; HOLD -> RUN when both are fresh again; HOLD lasting ``estop_after_s`` -> ESTOP,
    which latches. The chunk check is armed only once the first chunk has arrived (callers pass None before), or
    the loop would e-stop during start-up while the first inference runs."""

    def __init__(self, obs_timeout_s: float, chunk_timeout_s: float, estop_after_s: float) -> None:
        for name, value in (
            ("obs_timeout_s", obs_timeout_s),
            ("chunk_timeout_s", chunk_timeout_s),
            ("estop_after_s", estop_after_s),
        ):
            if not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        self.obs_timeout_s, self.chunk_timeout_s, self.estop_after_s = obs_timeout_s, chunk_timeout_s, estop_after_s
        self.state = RUN
        self.reason = ""
        self._hold_since: float | None = None

    def update(self, now: float, obs_age_s: float, chunk_overdue_s: float | None) -> str:
        """New state given the newest observation's age (inf when there is none) and how long the action queue has
        been exhausted (negative while actions remain; None while no chunk has arrived yet)."""
        if self.state == ESTOP:
            return ESTOP
        reasons = []
        if not obs_age_s <= self.obs_timeout_s:
            reasons.append(f"observation {obs_age_s:.3f} s old")
        if chunk_overdue_s is not None and chunk_overdue_s > self.chunk_timeout_s:
            reasons.append(f"actions exhausted {chunk_overdue_s:.3f} s ago")
        if not reasons:
            self.state, self.reason, self._hold_since = RUN, "", None
        elif self._hold_since is None:
            self.state, self.reason, self._hold_since = HOLD, "; ".join(reasons), now
        elif now - self._hold_since >= self.estop_after_s:
            self.state, self.reason = ESTOP, f"held {now - self._hold_since:.3f} s: " + "; ".join(reasons)
        else:
            self.reason = "; ".join(reasons)
        return self.state
