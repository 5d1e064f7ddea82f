"""The timed action queue of the control loop (merge rules, stale-action dropping, interpolation) and the physics
sub-step the real-time Push-T simulator runs."""

from __future__ import annotations

import numpy as np
import pytest

from deploy.action_queue import TimedActionQueue
from deploy.types import TimedChunk
from envs.pusht import PushTEnv


def chunk(t0: float, values: list[float], dt: float = 0.1, inference_s: float = 0.0) -> TimedChunk:
    """A 1-d chunk: action i = values[i] at t0 + i * dt."""
    return TimedChunk(t0=t0, dt=dt, actions=np.array(values)[:, None], t_obs=t0, inference_s=inference_s)


def queued(queue: TimedActionQueue) -> list[tuple[float, float]]:
    return [(round(float(t), 9), float(a[0])) for t, a in zip(queue.times, queue.actions, strict=True)]


def test_stale_actions_are_dropped_and_counted():
    queue = TimedActionQueue(1)
    # Observation at t=0, result at now=0.25: actions at 0.0, 0.1, 0.2 are already due.
    assert queue.merge(chunk(0.0, [0, 1, 2, 3, 4]), now=0.25) == 3
    assert queued(queue) == [(0.3, 3.0), (0.4, 4.0)]
    # With 0.1 s execution latency the action at 0.3 is due too.
    queue.clear()
    assert queue.merge(chunk(0.0, [0, 1, 2, 3, 4]), now=0.25, execution_latency=0.1) == 4
    assert queued(queue) == [(0.4, 4.0)]
    assert queue.dropped == 7
    # A chunk entirely in the past leaves the queue as it was.
    assert queue.merge(chunk(0.0, [9, 9]), now=1.0) == 2
    assert queued(queue) == [(0.4, 4.0)]


def test_replace_keeps_queued_actions_before_the_new_chunk():
    queue = TimedActionQueue(1)
    queue.merge(chunk(0.0, [0, 1, 2, 3, 4, 5]), now=0.0)
    queue.merge(chunk(0.25, [10, 11, 12, 13]), now=0.26)  # first new action (0.25) is due -> dropped
    # Pruned up to the last action at or before now (0.2, the interpolation bracket), then the new chunk from 0.35.
    assert queued(queue) == [(0.2, 2.0), (0.3, 3.0), (0.35, 11.0), (0.45, 12.0), (0.55, 13.0)]


def test_blend_weight_rises_linearly_over_the_overlap():
    queue = TimedActionQueue(1)
    queue.merge(chunk(0.0, [0, 0, 0, 0, 0, 0, 0]), now=0.0)  # zeros until 0.6
    queue.merge(chunk(0.2, [10, 10, 10, 10, 10, 10]), now=0.2, rule="blend")  # 0.2 .. 0.7, overlap 0.2 .. 0.6
    times, values = np.array(queued(queue)).T
    np.testing.assert_allclose(times, [0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    # New-chunk weight (t - 0.2) / 0.4 over the overlap, then the new chunk alone.
    np.testing.assert_allclose(values, [0.0, 2.5, 5.0, 7.5, 10.0, 10.0])


def test_blend_interpolates_the_old_queue_between_its_actions():
    queue = TimedActionQueue(1)
    queue.merge(chunk(0.0, [0, 10, 20, 30]), now=0.0)  # until 0.3
    queue.merge(chunk(0.15, [100, 100, 100]), now=0.0, rule="blend")  # overlap 0.15 (old 15, w 0), 0.25 (w 1)
    _, values = np.array(queued(queue)).T
    np.testing.assert_allclose(values, [0.0, 10.0, 15.0, 100.0, 100.0])


def test_freeze_commits_the_actions_that_run_during_inference():
    queue = TimedActionQueue(1)
    queue.merge(chunk(0.0, [0, 1, 2, 3, 4, 5, 6]), now=0.0)  # until 0.6
    # Observation at 0.1, inference 0.15 s, merged at now=0.25 with 0.05 s execution latency:
    # horizon = 0.25 + 0.05 + 0.15 = 0.45; queued actions before it stay, new ones before it are discarded.
    dropped = queue.merge(chunk(0.1, [10, 11, 12, 13, 14, 15, 16], inference_s=0.15), 0.25, "freeze", 0.05)
    assert dropped == 2  # 0.1 and 0.2 are due (< 0.3)
    assert queued(queue) == [(0.2, 2.0), (0.3, 3.0), (0.4, 4.0), (0.5, 14.0), (0.6, 15.0), (0.7, 16.0)]
    # An explicit horizon overrides the measured one.
    queue.clear()
    queue.merge(chunk(0.0, [0, 1, 2, 3]), now=0.0)
    queue.merge(chunk(0.0, [10, 11, 12, 13]), now=0.0, rule="freeze", freeze_until=0.15)
    assert queued(queue) == [(0.0, 0.0), (0.1, 1.0), (0.2, 12.0), (0.3, 13.0)]


def test_freeze_uses_the_new_chunk_where_the_queue_has_nothing():
    queue = TimedActionQueue(1)
    queue.merge(chunk(0.0, [5, 6, 7], inference_s=1.0), now=0.0, rule="freeze")  # empty queue: nothing to keep
    assert queued(queue) == [(0.0, 5.0), (0.1, 6.0), (0.2, 7.0)]
    queue.merge(chunk(0.1, [10, 11, 12, 13], inference_s=1.0), now=0.1, rule="freeze")  # horizon 1.1 past end 0.2
    assert queued(queue) == [(0.1, 6.0), (0.2, 7.0), (0.3, 12.0), (0.4, 13.0)]


def test_sample_interpolation_and_exhaustion():
    queue = TimedActionQueue(2)
    assert queue.sample(0.0) is None and queue.exhausted(0.0) and queue.remaining(0.0) == 0.0 and queue.end is None
    queue.merge(TimedChunk(t0=1.0, dt=0.1, actions=[[0.0, 10.0], [1.0, 20.0], [3.0, 0.0]], t_obs=1.0), now=1.0)
    np.testing.assert_allclose(queue.sample(1.05), [0.5, 15.0])  # linear between 1.0 and 1.1
    np.testing.assert_allclose(queue.sample(1.05, "hold"), [0.0, 10.0])
    np.testing.assert_allclose(queue.sample(1.15), [2.0, 10.0])
    np.testing.assert_allclose(queue.sample(0.5), [0.0, 10.0])  # before the first action: the first one
    assert queue.remaining(1.05) == pytest.approx(0.15) and not queue.exhausted(1.05)
    for interpolation in ("linear", "hold"):  # after the last action: held, and reported exhausted
        np.testing.assert_allclose(queue.sample(2.0, interpolation), [3.0, 0.0])
    assert queue.exhausted(2.0) and queue.remaining(2.0) == 0.0 and queue.end == pytest.approx(1.2)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="action_dim must be a positive int, got 0"):
        TimedActionQueue(0)
    queue = TimedActionQueue(2)
    with pytest.raises(ValueError, match="rule must be one of .* got 'average'"):
        queue.merge(chunk(0.0, [1.0]), now=0.0, rule="average")
    with pytest.raises(ValueError, match=r"chunk actions must have shape \[n, 2\], got \(1, 1\)"):
        queue.merge(chunk(0.0, [1.0]), now=0.0)
    with pytest.raises(ValueError, match="interpolation must be one of .* got 'cubic'"):
        queue.sample(0.0, "cubic")


def test_ten_physics_sub_steps_are_one_env_step():
    stepped, sub_stepped = PushTEnv(), PushTEnv()
    stepped.reset(seed=100001)
    sub_stepped.reset(seed=100001)
    targets = np.random.default_rng(0).uniform(50, 450, size=(20, 2))
    for target in targets:
        stepped.step(target)
        for _ in range(10):
            sub_stepped.physics_step(target)
    assert sub_stepped.physics_dt == 0.01
    np.testing.assert_array_equal(sub_stepped.get_state(), stepped.get_state())  # bitwise: same operations
    np.testing.assert_array_equal(sub_stepped.observation()["state"], stepped.observation()["state"])
    with pytest.raises(ValueError, match="action must be 2 finite numbers"):
        sub_stepped.physics_step(np.array([np.nan, 1.0]))
