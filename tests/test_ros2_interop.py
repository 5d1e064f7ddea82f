"""Ros2Robot against a real ROS 2 node: rclpy from the community ``ros-rclpy`` wheels (Fast DDS) in a subprocess.

Needs a separate virtual environment with the wheels (about 260 MB, 20-40 s to install; README "ROS 2 bridge"):

    python3 -m venv ../rclpy-venv
    ../rclpy-venv/bin/pip install ros-rclpy==9.1.2 ros-rmw-fastrtps-cpp ros-sensor-msgs ros-std-msgs \
        ros-trajectory-msgs

found through ``$ROBODIFF_RCLPY_PYTHON`` (default ``../rclpy-venv/bin/python`` next to the checkout). Both the
Jazzy (ros-rclpy 7.1.6, Fast DDS 2.14) and the Kilted (9.1.2, Fast DDS 3) wheels pass. All traffic stays on loopback:
our Cyclone participant is configured loopback-only and the rclpy node runs with ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
(peer.PeerProcess). For a hard guarantee run it in a private network namespace:
``unshare -n sh -c 'ip link set lo up && python -m pytest tests/test_ros2_interop.py'`` (root).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

pytest.importorskip("cyclonedds", reason="the ros2 extra (cyclonedds) is not installed: pip install -e '.[ros2]'")

from deploy.ros2.peer import DEFAULT_RCLPY_PYTHON, RCLPY_PYTHON_ENV, PeerProcess, rclpy_python  # noqa: E402
from deploy.ros2.robot import Ros2Robot, Ros2RobotConfig  # noqa: E402
from deploy.types import TimedChunk  # noqa: E402

pytestmark = pytest.mark.skipif(
    rclpy_python() is None,
    reason=f"no ROS 2 rclpy environment: set {RCLPY_PYTHON_ENV} to the python of a venv with the ros-rclpy wheels "
    f"(default {DEFAULT_RCLPY_PYTHON}; see the module docstring)",
)

PEER_JOINTS = ["j3", "j1", "extra", "j2"]  # a driver's order and an extra joint we do not control
JOINTS = ["j1", "j2", "j3"]
IMAGE_SHAPE = [48, 64, 3]


@pytest.fixture(scope="module")
def bridge():
    domain = 150 + os.getpid() % 50  # our tests' range: apart from other DDS users of this machine
    image = {"image_topic": "/camera/image_raw", "image_shape": IMAGE_SHAPE}
    shape = ",".join(map(str, IMAGE_SHAPE))
    peer = PeerProcess("rclpy", domain, PEER_JOINTS, rate=100.0, duration=60.0, **image | {"image_shape": shape})
    robot = Ros2Robot(Ros2RobotConfig(joint_names=JOINTS, domain_id=domain, publish="both", **image))
    robot.start()
    try:
        peer.wait_for(lambda e: e["event"] == "ready", timeout=20)
        end = time.monotonic() + 20
        while time.monotonic() < end and min(robot.matched().values()) < 1:
            time.sleep(0.01)
        assert min(robot.matched().values()) >= 1, f"no DDS match with the rclpy node: {robot.matched()}"
        while time.monotonic() < end and robot.read() is None:
            time.sleep(0.01)
        yield robot, peer
    finally:
        robot.close()
        peer.close()


def test_joint_state_from_rclpy(bridge):
    robot, _ = bridge
    stamps, ages = [], []
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        obs = robot.read()
        if obs is not None and (not stamps or obs.stamp != stamps[-1]):
            stamps.append(obs.stamp)
            ages.append(time.monotonic() - obs.stamp)
            # rclpy_peer publishes position[i] = 0.1 * (i + 1) + 0.001 * count in PEER_JOINTS order.
            step = obs.data["state"] - np.array([0.2, 0.4, 0.1])
            np.testing.assert_allclose(step, step[0], atol=1e-9)
            assert step[0] >= 0
            # ... and an rgb8 image with every byte = count % 256 (the fixed-array Image type, msgs.image_type).
            image = obs.data["image"]
            assert image.shape == tuple(IMAGE_SHAPE) and image.dtype == np.uint8 and np.all(image == image.flat[0])
            lag = (round(step[0] / 0.001) - int(image.flat[0])) % 256  # image and state are read independently
            assert min(lag, 256 - lag) <= 3
        time.sleep(0.002)
    assert robot.incomplete_states == 0
    # 100 Hz for 1 s on a shared machine: loose bounds. Header stamps converted to monotonic are in the recent past.
    assert len(stamps) >= 30, f"only {len(stamps)} JointState updates in 1 s"
    assert np.all(np.diff(stamps) > 0)
    assert -0.01 < np.median(ages) < 0.1, f"median observation age {np.median(ages)} s"


def test_commands_reach_rclpy(bridge):
    robot, peer = bridge
    n_before = len(peer.events)
    sent_wall = time.time()
    robot.command(np.array([0.5, -0.25, 1.0]), time.monotonic())
    t0 = time.monotonic() + 0.2
    expected_stamp = t0 + time.time() - time.monotonic()
    robot.publish_chunk(TimedChunk(t0=t0, dt=0.1, actions=np.arange(12.0).reshape(4, 3) / 10, t_obs=t0 - 0.2))
    robot.stop()

    def nth(kind: str, k: int) -> dict:
        peer.wait_for(lambda e: sum(x["event"] == kind for x in peer.events[n_before:]) > k, timeout=10)
        return [e for e in peer.events[n_before:] if e["event"] == kind][k]

    single, chunk, hold = nth("trajectory", 0), nth("trajectory", 1), nth("trajectory", 2)
    assert single["joint_names"] == JOINTS and single["points"] == [[0.5, -0.25, 1.0]]
    assert single["stamp"] == 0.0 and single["time_from_start"] == pytest.approx([0.02])
    assert chunk["stamp"] == pytest.approx(expected_stamp, abs=2e-3)
    np.testing.assert_allclose(chunk["points"], np.arange(12.0).reshape(4, 3) / 10)
    assert chunk["time_from_start"] == pytest.approx([0.0, 0.1, 0.2, 0.3], abs=1e-9)
    assert hold["points"] == [] and hold["joint_names"] == JOINTS  # empty trajectory = stop and hold
    # One-way latency on loopback is about a millisecond; a loose bound for a shared CI machine.
    assert 0 <= single["recv_wall"] - sent_wall < 0.5

    array, array_chunk, array_hold = nth("array", 0), nth("array", 1), nth("array", 2)
    assert array["dims"] == [["joints", 3, 3]] and array["data"] == [0.5, -0.25, 1.0]
    assert array_chunk["dims"] == [["time", 4, 12], ["joints", 3, 3]]
    np.testing.assert_allclose(array_chunk["data"], np.arange(12.0) / 10)
    step = np.array(array_hold["data"]) - np.array([0.2, 0.4, 0.1])  # hold = the newest measured positions
    np.testing.assert_allclose(step, step[0], atol=1e-9)
