"""Timestamped action queue of the control loop: merges asynchronous chunks and samples them at the control rate.

Every queued action has an absolute time (monotonic seconds, deploy/types.py). Chunks computed from older observations
overlap the queue; `merge` combines them by one of three rules:

- "replace": the new chunk wins from its first kept action on (SmolVLA-style asynchronous inference);
- "blend": over the overlap the weight of the new chunk rises linearly in time from 0 to 1 (a continuous hand-over,
  like ACT's temporal ensembling but between two chunks);
- "freeze": real-time chunking (Black et al. 2025, RTC): the actions that execute while the new chunk was being
  computed (times < now + execution latency + the chunk's inference latency) are committed and stay; the new chunk
  supplies the rest.

Actions of a new chunk that are already due (time < now + execution latency) are dropped and counted.
"""

from __future__ import annotations

import numpy as np

from deploy.types import TimedChunk

MERGE_RULES = ("replace", "blend", "freeze")
INTERPOLATIONS = ("linear", "hold")


class TimedActionQueue:
    """Actions ``[N, Da]`` at increasing times ``[N]``; `dropped` counts stale actions discarded at merge."""

    def __init__(self, action_dim: int) -> None:
        if isinstance(action_dim, bool) or not isinstance(action_dim, int) or action_dim < 1:
            raise ValueError(f"action_dim must be a positive int, got {action_dim!r}")
        self.action_dim = action_dim
        self.dropped = 0
        self.clear()

    def clear(self) -> None:
        """Forget every queued action (the stale-drop counter stays)."""
        self.times = np.zeros(0)
        self.actions = np.zeros((0, self.action_dim))

    def __len__(self) -> int:
        return len(self.times)

    def merge(
        self,
        chunk: TimedChunk,
        now: float,
        rule: str = "replace",
        execution_latency: float = 0.0,
        freeze_until: float | None = None,
    ) -> int:
        """Merge ``chunk`` (actions ``[n, Da]`` at ``chunk.times``) at time ``now``; returns how many of its actions
        were dropped as already due. ``freeze_until`` overrides the "freeze" horizon (default now +
        execution_latency + chunk.inference_s)."""
        if rule not in MERGE_RULES:
            raise ValueError(f"rule must be one of {MERGE_RULES}, got {rule!r}")
        if chunk.actions.shape[1] != self.action_dim:
            raise ValueError(f"chunk actions must have shape [n, {self.action_dim}], got {chunk.actions.shape}")
        cutoff = now + execution_latency
        times, actions = chunk.times, chunk.actions
        due = times < cutoff
        n_dropped = int(due.sum())
        self.dropped += n_dropped
        times, actions = times[~due], actions[~due]
        self._prune(now)
        if len(times) == 0:
            return n_dropped
        old_t, old_a = self.times, self.actions
        if rule == "freeze":
            horizon = cutoff + chunk.inference_s if freeze_until is None else freeze_until
            # Only actions the queue actually has are committed; past its end the new chunk is used even before the
            # horizon (the first chunk of an episode, or an exhausted queue).
            old_end = old_t[-1] if len(old_t) else -np.inf
            keep_new = (times >= horizon) | (times > old_end)
            times, actions = times[keep_new], actions[keep_new]
            if len(times) == 0:
                return n_dropped
        elif rule == "blend" and len(old_t) and old_t[-1] > times[0]:
            overlap = times <= old_t[-1]  # new actions inside the span of the queued ones
            t_start, t_end = times[0], times[overlap][-1]
            w = np.clip((times[overlap] - t_start) / (t_end - t_start), 0.0, 1.0) if t_end > t_start else np.ones(1)
            old_at = self._interpolate(old_t, old_a, times[overlap])  # [n_overlap, Da]
            actions = actions.copy()
            actions[overlap] = (1.0 - w[:, None]) * old_at + w[:, None] * actions[overlap]
        # Every rule: queued actions before the first kept new action stay, the new ones follow.
        before = old_t < times[0]
        self.times = np.concatenate([old_t[before], times])
        self.actions = np.concatenate([old_a[before], actions])
        return n_dropped

    def sample(self, t: float, interpolation: str = "linear") -> np.ndarray | None:
        """The action ``[Da]`` at time ``t``: linear between the bracketing actions (or the last one at or before ``t``
        with "hold"); before the first action the first one, after the last one the last one (`exhausted` then says
        so); None when empty."""
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        if len(self.times) == 0:
            return None
        if interpolation == "hold":
            i = max(int(np.searchsorted(self.times, t, side="right")) - 1, 0)
            return self.actions[i].copy()
        return self._interpolate(self.times, self.actions, np.array([t]))[0]

    @property
    def end(self) -> float | None:
        """Time of the last queued action (None when empty)."""
        return float(self.times[-1]) if len(self.times) else None

    def remaining(self, t: float) -> float:
        """Seconds of queued actions after ``t`` (0 when empty or exhausted)."""
        return max(float(self.times[-1]) - t, 0.0) if len(self.times) else 0.0

    def exhausted(self, t: float) -> bool:
        """True when no queued action lies after ``t``."""
        return self.remaining(t) <= 0.0

    def _prune(self, now: float) -> None:
        # Keep the last action at or before `now`: it is the left bracket of the linear interpolation.
        first = max(int(np.searchsorted(self.times, now, side="right")) - 1, 0)
        self.times, self.actions = self.times[first:], self.actions[first:]

    @staticmethod
    def _interpolate(times: np.ndarray, actions: np.ndarray, at: np.ndarray) -> np.ndarray:
        """``actions [N, Da]`` at ``times [N]`` -> ``[len(at), Da]``, linear inside, held constant outside."""
        return np.stack([np.interp(at, times, actions[:, d]) for d in range(actions.shape[1])], axis=-1)
