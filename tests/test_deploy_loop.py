"""The control loop against the real-time Push-T simulator process and a small in-process ChunkProvider.

Timing bounds are loose on purpose: the test machine is shared and has no real-time kernel."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from deploy.loop import ControlLoop, LoopConfig
from deploy.safety import Limits
from deploy.sim_pusht import SimPushTRobot
from deploy.types import Observation, TimedChunk

CORNERS = np.array([[100.0, 100.0], [400.0, 400.0]])


def far_corner(agent: np.ndarray) -> np.ndarray:
    """The one of two corners farther from ``agent`` (the simulator is shared by the tests of this module)."""
    return CORNERS[np.argmax(np.linalg.norm(CORNERS - agent, axis=1))]


class LineProvider:
    """A ChunkProvider computing, after ``latency_s``, actions that walk the agent from its observed position to
    ``goal`` at ``speed`` px/s: sync -> one action per request, async -> ``horizon`` actions at ``t_obs + i * dt``.
    ``stall`` = (start, end) seconds after the first request during which finished results are withheld;
    ``release_delay_s``: the poll that hands over the first result after the stall sleeps that long first (the control
    tick is preempted between its wake-up and its command)."""

    def __init__(
        self,
        mode,
        goal,
        dt=0.1,
        horizon=8,
        latency_s=0.03,
        speed=200.0,
        stall=None,
        slow_poll_at=None,
        release_delay_s=None,
    ):
        self.goal = np.asarray(goal, dtype=np.float64)
        self.mode, self.dt, self.horizon, self.latency_s, self.speed = mode, dt, horizon, latency_s, speed
        self.stall, self.slow_poll_at, self.release_delay_s = stall, slow_poll_at, release_delay_s
        self.pending: tuple[Observation, float] | None = None
        self.t_first: float | None = None
        self.requests = 0
        self.observed = 0

    def reset(self) -> None:
        self.pending, self.t_first = None, None

    def observe(self, obs: Observation) -> None:
        self.observed += 1

    def request(self, obs: Observation) -> bool:
        if self.pending is not None:
            return False
        self.t_first = time.monotonic() if self.t_first is None else self.t_first
        self.pending = (obs, time.monotonic() + self.latency_s)
        self.requests += 1
        return True

    def poll(self) -> TimedChunk | None:
        now = time.monotonic()
        if self.slow_poll_at is not None and self.t_first is not None and now - self.t_first > self.slow_poll_at:
            self.slow_poll_at = None
            time.sleep(0.1)  # one stalled control tick: 5 periods at 50 Hz
        if self.pending is None or now < self.pending[1]:
            return None
        if self.stall is not None and self.stall[0] <= now - self.t_first < self.stall[1]:
            return None
        if self.release_delay_s is not None and self.stall is not None and now - self.t_first >= self.stall[1]:
            time.sleep(self.release_delay_s)
            self.release_delay_s = None
        obs, _ = self.pending
        self.pending = None
        n = 1 if self.mode == "sync" else self.horizon
        agent = obs.data["state"][-2:].astype(np.float64)
        step = (self.goal - agent) / max(np.linalg.norm(self.goal - agent), 1e-9) * self.speed * self.dt
        actions = agent + step * np.arange(1, n + 1)[:, None]
        return TimedChunk(t0=obs.stamp, dt=self.dt, actions=actions, t_obs=obs.stamp, inference_s=self.latency_s)

    def close(self) -> None:
        pass


class RecordingRobot:
    """The simulator, recording every command with the time it was sent (to check the velocity bound)."""

    def __init__(self, robot: SimPushTRobot) -> None:
        self.robot, self.action_dim = robot, robot.action_dim
        self.commands: list[tuple[float, np.ndarray]] = []
        self.stops = 0

    def start(self) -> None:
        pass

    def read(self) -> Observation | None:
        return self.robot.read()

    def command(self, target: np.ndarray, stamp: float) -> None:
        self.commands.append((time.monotonic(), np.array(target)))
        self.robot.command(target, stamp)

    def stop(self) -> None:
        self.stops += 1
        self.robot.stop()

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def sim():
    with SimPushTRobot(seed=100000) as robot:
        yield robot


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_loop_drives_the_simulator_on_time(sim, mode, tmp_path):
    robot = RecordingRobot(sim)
    start = sim.read().data["state"][-2:].astype(np.float64)
    goal = far_corner(start)
    provider = LineProvider(mode, goal)
    config = LoopConfig(mode=mode, merge_rule="replace" if mode == "sync" else "freeze", request_threshold_s=0.3)
    loop = ControlLoop(robot, provider, config)
    summary = loop.run(max_duration_s=1.0)
    assert summary["ended_by"] == "duration" and summary["final_state"] == "RUN"
    assert 45 <= summary["ticks"] + summary["missed_ticks"] <= 51  # 50 Hz for 1 s
    assert summary["lateness_ms"]["p50"] < 5.0  # sleep + spin: well under 1 ms when the machine is idle
    assert summary["watchdog_ticks"]["ESTOP"] == 0 and summary["watchdog_ticks"]["HOLD"] <= 2
    assert summary["chunks"] >= (8 if mode == "sync" else 1)
    if mode == "async":  # every policy tick reaches the source's observation window, not only the requests
        assert 8 <= provider.observed <= 11 and provider.requests < provider.observed
    assert summary["obs_age_ms"]["p50"] < 30.0  # 100 Hz observations
    moved = sim.read().data["state"][-2:]
    assert np.linalg.norm(moved - goal) < np.linalg.norm(start - goal) - 60.0, (start, moved, goal)
    loop.metrics.write_json(tmp_path / "metrics.json")
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["summary"]["ticks"] == summary["ticks"] and len(written["ticks"]) == summary["ticks"]


def test_late_tick_is_skipped_and_counted_and_velocity_stays_bounded(sim):
    robot = RecordingRobot(sim)
    limits = Limits(low=0.0, high=512.0, max_velocity=150.0)
    config = LoopConfig(mode="async", merge_rule="blend", limits=limits)
    loop = ControlLoop(
        robot, LineProvider("async", far_corner(sim.read().data["state"][-2:]), speed=400.0, slow_poll_at=0.3), config
    )
    summary = loop.run(max_duration_s=0.8)
    assert summary["missed_ticks"] >= 4  # one 100 ms stall at 50 Hz
    deadlines = np.array([r.deadline for r in loop.metrics.ticks])
    gaps = np.diff(deadlines) * 50.0
    np.testing.assert_allclose(gaps, np.round(gaps), atol=1e-6)  # ticks stay on the t0 + k dt grid
    assert np.sum(np.round(gaps) - 1) == summary["missed_ticks"]  # skipped, never run as a burst
    assert summary["limit_events"]["clamped_velocity"] > 0
    times = np.array([t for t, _ in robot.commands])
    targets = np.stack([c for _, c in robot.commands])
    step = np.abs(np.diff(targets, axis=0)).max(axis=1)
    # Bounded by the time between commands (the stalled tick may move further, never faster); 6 ms of slack: the
    # loop measures just before the recording robot does and a shared machine can preempt in between (a 5 ms
    # preemption was seen under a full test run). Unclamped, the 400 px/s line would step 8 px per 20 ms tick,
    # far above 150 px/s * 26 ms = 3.9 px.
    assert np.all(step <= 150.0 * (np.diff(times) + 0.006))
    assert step.max() > 150.0 * 0.03  # the tick after the stall used its longer measured elapsed time


@pytest.mark.parametrize(("stall_end", "estop"), [(0.55, False), (10.0, True)])
def test_inference_stall_holds_then_recovers_or_estops(sim, stall_end, estop):
    robot = RecordingRobot(sim)
    provider = LineProvider("sync", far_corner(sim.read().data["state"][-2:]), speed=600.0, stall=(0.2, stall_end))
    limits = Limits(max_velocity=150.0)
    config = LoopConfig(mode="sync", chunk_timeout_s=0.1, estop_after_s=0.4, limits=limits)
    summary = ControlLoop(robot, provider, config).run(max_duration_s=1.2)
    assert summary["watchdog_ticks"]["HOLD"] >= 5 and robot.stops >= 2  # entering HOLD, then the end of run
    if estop:
        assert summary["ended_by"].startswith("estop") and summary["final_state"] == "ESTOP"
        assert summary["watchdog_ticks"]["HOLD"] <= 0.4 * 50 + 2
    else:
        assert summary["ended_by"] == "duration" and summary["final_state"] == "RUN"
    # Also across the hold (no command for >= 0.1 s): the first command after it moves as after one period.
    step = np.abs(np.diff(np.stack([c for _, c in robot.commands]), axis=0)).max(axis=1)
    assert step.max() <= 150.0 * 0.05, step.max()


def test_first_command_after_hold_is_bounded_over_one_period_when_the_tick_is_preempted(sim):
    # The tick that ends the hold is delayed 80 ms between its wake-up and its command: the first command after the
    # hold must still move as after one 20 ms period (150 px/s * 0.02 s = 3 px), not as after 100 ms (15 px).
    robot = RecordingRobot(sim)
    provider = LineProvider(
        "sync", far_corner(sim.read().data["state"][-2:]), speed=600.0, stall=(0.2, 0.55), release_delay_s=0.08
    )
    config = LoopConfig(mode="sync", chunk_timeout_s=0.1, estop_after_s=0.4, limits=Limits(max_velocity=150.0))
    summary = ControlLoop(robot, provider, config).run(max_duration_s=1.0)
    assert summary["watchdog_ticks"]["HOLD"] >= 5 and summary["final_state"] == "RUN"
    assert provider.release_delay_s is None  # the delayed release happened
    step = np.abs(np.diff(np.stack([c for _, c in robot.commands]), axis=0)).max(axis=1)
    assert step.max() <= 150.0 * 0.05, step.max()


def test_stop_when_ends_the_run(sim):
    summary = ControlLoop(RecordingRobot(sim), LineProvider("sync", CORNERS[0]), LoopConfig()).run(
        max_duration_s=5.0, stop_when=lambda obs: obs.info["steps"] > 0
    )
    assert summary["ended_by"] == "stop_when" and summary["ticks"] == 0


def test_loop_config_validation():
    with pytest.raises(ValueError, match="policy_hz must divide control_hz"):
        LoopConfig(control_hz=50.0, policy_hz=15.0)
    with pytest.raises(ValueError, match="merge_rule"):
        LoopConfig(merge_rule="average")
    with pytest.raises(ValueError, match="spin_s"):
        LoopConfig(spin_s=0.05)
