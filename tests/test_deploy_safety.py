"""Command limits (box, measured-elapsed velocity bound, rejection) and the watchdog state machine."""

from __future__ import annotations

import numpy as np
import pytest

from deploy.safety import ESTOP, HOLD, RUN, Limits, Watchdog


def test_limits_clamp_to_the_intersection_of_position_and_workspace_boxes():
    limits = Limits(low=0.0, high=512.0, workspace_low=[10.0, 20.0], workspace_high=[500.0, 400.0])
    command, event = limits.apply(np.array([5.0, 450.0]), None, 0.02)
    np.testing.assert_allclose(command, [10.0, 400.0])
    assert event == "clamped_position"
    command, event = limits.apply(np.array([100.0, 100.0]), None, 0.02)
    np.testing.assert_allclose(command, [100.0, 100.0])
    assert event is None


def test_velocity_bound_uses_the_measured_elapsed_time_after_a_late_tick():
    limits = Limits(max_velocity=100.0)  # units / s
    previous = np.array([0.0, 0.0])
    # Nominal 50 Hz tick: at most 2 units; a tick 30 ms late may move 5 units, never more.
    for elapsed in (0.02, 0.05):
        command, event = limits.apply(np.array([50.0, -50.0]), previous, elapsed)
        assert event == "clamped_velocity"
        assert np.all(np.abs(command - previous) <= 100.0 * elapsed + 1e-12)
        np.testing.assert_allclose(np.abs(command - previous), 100.0 * elapsed)
    command, event = limits.apply(np.array([1.0, -1.0]), previous, 0.02)
    np.testing.assert_allclose(command, [1.0, -1.0])
    assert event is None


@pytest.mark.parametrize("bad", [[np.nan, 1.0], [np.inf, 1.0], [1.0, -np.inf], [700.0, 1.0]])
def test_nonfinite_or_far_out_of_range_targets_are_rejected_and_the_previous_command_kept(bad):
    limits = Limits(low=0.0, high=512.0, max_velocity=100.0, reject_margin=50.0)
    previous = np.array([10.0, 20.0])
    command, event = limits.apply(np.array(bad), previous, 0.02)
    assert event == "rejected"
    np.testing.assert_array_equal(command, previous)
    assert limits.apply(np.array(bad), None, 0.02) == (None, "rejected")
    # Within the margin it is clamped, not rejected.
    assert limits.apply(np.array([540.0, 20.0]), None, 0.02)[1] == "clamped_position"


def test_limits_validation_names_the_field():
    with pytest.raises(ValueError, match="max_velocity must be > 0"):
        Limits(max_velocity=0.0)
    with pytest.raises(ValueError, match="lower bounds must not exceed upper bounds"):
        Limits(low=10.0, high=0.0)
    with pytest.raises(ValueError, match="reject_margin"):
        Limits(reject_margin=-1.0)
    with pytest.raises(ValueError, match="estop_after_s"):
        Watchdog(0.1, 0.1, 0.0)


def test_watchdog_stays_armed_off_until_the_first_chunk():
    dog = Watchdog(obs_timeout_s=0.1, chunk_timeout_s=0.1, estop_after_s=0.5)
    for now in np.arange(0.0, 2.0, 0.02):  # start-up: inference has not answered for 2 s
        assert dog.update(now, obs_age_s=0.01, chunk_overdue_s=None) == RUN


def test_watchdog_holds_on_an_inference_stall_and_recovers_without_estop():
    dog = Watchdog(obs_timeout_s=0.1, chunk_timeout_s=0.1, estop_after_s=0.5)
    states = []
    for now in np.arange(0.0, 1.0, 0.02):
        # Actions run out at 0.2 s; the stalled inference delivers again at 0.6 s (HOLD for ~0.3 s < 0.5 s).
        overdue = now - 0.2 if now < 0.6 else -0.5
        states.append(dog.update(now, obs_age_s=0.01, chunk_overdue_s=overdue))
    assert states[0] == RUN and HOLD in states and ESTOP not in states and states[-1] == RUN
    first_hold = states.index(HOLD)
    assert 0.3 <= first_hold * 0.02 <= 0.32 + 1e-9  # overdue > 0.1 s after the end at 0.2 s


def test_watchdog_estops_after_a_long_stall_and_latches():
    dog = Watchdog(obs_timeout_s=0.1, chunk_timeout_s=0.1, estop_after_s=0.5)
    states = [dog.update(now, 0.01, now - 0.2) for now in np.arange(0.0, 1.2, 0.02)]
    assert states[states.index(HOLD) :].count(HOLD) == 25  # 0.5 s of HOLD at 50 Hz, then ESTOP
    assert states[-1] == ESTOP and "held" in dog.reason
    assert dog.update(2.0, 0.01, -1.0) == ESTOP  # fresh again: still latched


def test_watchdog_holds_on_a_stale_observation():
    dog = Watchdog(obs_timeout_s=0.1, chunk_timeout_s=0.1, estop_after_s=0.5)
    assert dog.update(0.0, float("inf"), None) == HOLD
    assert "observation" in dog.reason
    assert dog.update(0.1, 0.05, None) == RUN
