"""The real-time Push-T simulator process behind SimPushTRobot (real subprocess and shared memory)."""

from __future__ import annotations

import time

import imageio.v3 as iio
import numpy as np
import pytest

from deploy.sim_pusht import SimPushTRobot
from envs.pusht import PushTEnv


@pytest.fixture(scope="module")
def robot():
    with SimPushTRobot(seed=100000) as sim:
        yield sim


def test_initial_observation_is_the_evaluation_protocol_state(robot):
    obs = robot.read()
    env = PushTEnv()
    expected, _ = env.reset(seed=100000)
    assert obs.data["state"].shape == (20,) and obs.data["state"].dtype == np.float32
    # Without a command the agent holds still and nothing touches the block.
    np.testing.assert_allclose(obs.data["state"], expected["state"], atol=1e-3)
    assert set(obs.info) >= {"coverage", "max_coverage", "success", "steps"}
    assert 0.0 <= time.monotonic() - obs.stamp < 0.2


def test_physics_runs_in_real_time_and_follows_commands(robot):
    first = robot.read()
    robot.command(np.array([300.0, 300.0]), time.monotonic())
    time.sleep(0.6)
    obs = robot.read()
    steps = obs.info["steps"] - first.info["steps"]
    assert 40 <= steps <= 75, f"{steps} physics steps in 0.6 s at 100 Hz"  # loose: shared machine
    assert obs.stamp > first.stamp
    np.testing.assert_allclose(obs.data["state"][-2:], [300.0, 300.0], atol=5.0)  # PD k_p 100, k_v 20 settles
    robot.stop()  # hold where it is: a later target change is not followed until the next command
    time.sleep(0.05)
    held = robot.read().data["state"][-2:]
    time.sleep(0.2)
    np.testing.assert_allclose(robot.read().data["state"][-2:], held, atol=1.0)


def test_command_validation(robot):
    with pytest.raises(ValueError, match="finite"):
        robot.command(np.array([np.nan, 1.0]), time.monotonic())
    with pytest.raises(ValueError, match="obs_hz must divide physics_hz"):
        SimPushTRobot(seed=0, obs_hz=30.0)


def test_simulator_crash_gives_the_worker_error():
    robot = SimPushTRobot(seed=-1)  # np.random.RandomState rejects negative seeds inside the simulator process
    with pytest.raises(RuntimeError, match="(?s)simulator process exited.*Seed must be"):
        robot.start()


def test_video_is_rendered_by_the_simulator(tmp_path):
    path = tmp_path / "sim.mp4"
    with SimPushTRobot(seed=100001, obs_hz=50.0, video_path=path, video_fps=20.0) as sim:
        sim.command(np.array([256.0, 256.0]), time.monotonic())
        time.sleep(0.5)
    frames = iio.imread(path)
    assert frames.ndim == 4 and frames.shape[-1] == 3 and 5 <= len(frames) <= 16


def test_seqlock_read_never_blocks_on_a_writer_preempted_mid_write():
    from deploy.sim_pusht import seqlock_read, seqlock_write

    buf = np.zeros(6)
    seqlock_write(buf, 0, slice(1, 6), np.arange(5.0))
    assert seqlock_read(buf, 0, slice(1, 6))[0] == 2
    buf[0] += 1  # the writer started a write and was descheduled: the counter stays odd
    assert seqlock_read(buf, 0, slice(1, 6), max_tries=50) is None  # the caller keeps its previous value
    buf[0] += 1
    seq, data = seqlock_read(buf, 0, slice(1, 6))
    assert seq == 4 and data.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
