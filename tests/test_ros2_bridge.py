"""ROS 2 bridge over DDS (deploy/ros2): wire format against rosbags, the ROS-to-DDS mapping, and a real exchange with
a plain Cyclone DDS peer in another process. All DDS traffic stays on 127.0.0.1 (dds.cyclone_config(True))."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cyclonedds", reason="the ROS 2 bridge needs the ros2 extra: pip install -e '.[ros2]'")
rosbags_typesys = pytest.importorskip("rosbags.typesys", reason="the CDR oracle needs rosbags (the ros2 extra)")

from cyclonedds.idl import IdlStruct  # noqa: E402

from deploy.ros2 import dds, msgs  # noqa: E402
from deploy.ros2.peer import PeerProcess  # noqa: E402
from deploy.ros2.robot import Ros2Robot, Ros2RobotConfig  # noqa: E402
from deploy.types import TimedChunk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TYPESTORE = rosbags_typesys.get_typestore(rosbags_typesys.Stores.ROS2_JAZZY)


def header(sec: int = 1_700_000_000, nanosec: int = 123_456_789, frame_id: str = "base_link") -> msgs.Header:
    return msgs.Header(stamp=msgs.Time(sec=sec, nanosec=nanosec), frame_id=frame_id)


def point(positions: list[float], t: float) -> msgs.JointTrajectoryPoint:
    velocities = [0.0] * len(positions)
    duration = msgs.duration_msg(t)
    return msgs.JointTrajectoryPoint(positions=positions, velocities=velocities, time_from_start=duration)


def image(height: int, width: int, channels: int) -> IdlStruct:
    n = height * width * channels
    return msgs.image_type(height, width, channels)(
        header=header(frame_id="camera"), encoding="rgb8", data=bytes(np.arange(n, dtype=np.uint8))
    )


# One instance of every message type we put on the wire; odd lengths and unaligned strings exercise CDR padding.
MESSAGES = {
    "Time": msgs.Time(sec=-3, nanosec=999_999_999),
    "Duration": msgs.Duration(sec=2, nanosec=5),
    "Header": header(frame_id="x"),
    "JointState": msgs.JointState(
        header=header(), name=["j1", "joint_2", "j3"], position=[0.1, -2.5, 3.0], velocity=[1.0, 2.0, 3.0], effort=[]
    ),
    "JointState_empty": msgs.JointState(header=header(frame_id=""), name=[], position=[], velocity=[], effort=[]),
    "JointTrajectoryPoint": point([1.0, 2.0], 0.25),
    "JointTrajectory": msgs.JointTrajectory(
        header=header(),
        joint_names=["a", "bb", "ccc"],
        points=[point([0.0, 1.0, 2.0], 0.0), point([3.0, 4.0, 5.0], 0.1)],
    ),
    "JointTrajectory_stop": msgs.JointTrajectory(header=header(0, 0, ""), joint_names=["a"], points=[]),
    "MultiArrayDimension": msgs.MultiArrayDimension(label="joint", size=7, stride=7),
    "MultiArrayLayout": msgs.float64_array(np.zeros((2, 3)), ("time", "joint")).layout,
    "Float64MultiArray": msgs.float64_array(np.arange(16 * 7, dtype=np.float64).reshape(16, 7) / 7, ("time", "joint")),
    "Image": image(3, 5, 3),
}


def to_rosbags(msg: IdlStruct) -> object:
    """The same content as a rosbags message object, field by field in rosbags' (= the .msg file's) order."""
    ros_type = msgs.ros_type_name(type(msg))
    cls = TYPESTORE.types[ros_type]
    values = {}
    for name in cls.__dataclass_fields__:
        if name == "__msgtype__":
            continue
        value = getattr(msg, name)
        if isinstance(value, IdlStruct):
            value = to_rosbags(value)
        elif isinstance(value, bytes):
            value = np.frombuffer(value, dtype=np.uint8)
        elif isinstance(value, list) and value and isinstance(value[0], IdlStruct):
            value = [to_rosbags(v) for v in value]
        elif isinstance(value, list) and not (value and isinstance(value[0], str)):
            # rosbags holds numeric sequences as numpy arrays (float64 for every sequence we use)
            value = np.asarray(value, dtype=np.float64)
        values[name] = value
    return cls(**values)


@pytest.mark.parametrize("name", list(MESSAGES))
def test_cdr_bytes_equal_rosbags(name):
    msg = MESSAGES[name]
    ours = msg.serialize()
    theirs = bytes(TYPESTORE.serialize_cdr(to_rosbags(msg), msgs.ros_type_name(type(msg))))
    assert ours[:4] == b"\x00\x01\x00\x00", "plain little-endian CDR (XCDR1) encapsulation, as ROS 2 uses"
    assert ours == theirs
    assert type(msg).deserialize(theirs) == msg


def test_dds_type_names_follow_rosidl():
    assert msgs.JointState.__idl_typename__ == "sensor_msgs::msg::dds_::JointState_"
    assert msgs.ros_type_name(msgs.JointTrajectory) == "trajectory_msgs/msg/JointTrajectory"
    assert msgs.ros_type_name(msgs.Float64MultiArray) == "std_msgs/msg/Float64MultiArray"
    assert msgs.ros_type_name(msgs.image_type(2, 2, 1)) == "sensor_msgs/msg/Image"


def test_topic_names_domain_and_config(monkeypatch):
    assert dds.dds_topic("/joint_states") == "rt/joint_states"
    assert dds.dds_topic("arm/commands") == "rt/arm/commands"
    for bad in ("", "/", "/a//b", "/a/"):
        with pytest.raises(ValueError, match="invalid ROS topic name"):
            dds.dds_topic(bad)
    monkeypatch.delenv("ROS_DOMAIN_ID", raising=False)
    assert dds.resolve_domain_id(None) == 0
    monkeypatch.setenv("ROS_DOMAIN_ID", "42")
    assert dds.resolve_domain_id(None) == 42
    assert dds.resolve_domain_id(7) == 7
    with pytest.raises(ValueError, match="domain_id must be in 0..232, got 233"):
        dds.resolve_domain_id(233)
    xml = dds.cyclone_config(loopback_only=True)
    assert "<IgnoreTypeInformation>1.15</IgnoreTypeInformation>" in xml
    assert '<NetworkInterface address="127.0.0.1"/>' in xml and "<AllowMulticast>false</AllowMulticast>" in xml
    assert "127.0.0.1" not in dds.cyclone_config(loopback_only=False)
    assert "IgnoreTypeInformation" in dds.cyclone_config(loopback_only=False)


def test_user_cyclonedds_uri_replaces_the_loopback_settings(monkeypatch):
    # A peer started with CYCLONEDDS_URI = our loopback XML must not select 127.0.0.1 twice (a Cyclone error).
    monkeypatch.setenv("CYCLONEDDS_URI", dds.cyclone_config(loopback_only=True))
    domain, participant = dds.open_participant(200 + os.getpid() % 30, loopback_only=True)
    assert participant.get_domain_id() == 200 + os.getpid() % 30
    del participant, domain


def test_qos_profiles():
    from cyclonedds.qos import Policy

    default, sensor = dds.qos("default"), dds.qos("sensor", depth=1)
    assert default[Policy.History] == Policy.History.KeepLast(10)
    assert isinstance(default[Policy.Reliability], Policy.Reliability.Reliable)
    assert sensor[Policy.History] == Policy.History.KeepLast(1)
    assert sensor[Policy.Reliability] == Policy.Reliability.BestEffort
    assert default[Policy.Durability] == sensor[Policy.Durability] == Policy.Durability.Volatile
    with pytest.raises(ValueError, match="QoS profile must be one of .* got 'fast'"):
        dds.qos("fast")


def test_type_hash_user_data():
    # REP 2011 type hash of sensor_msgs/msg/JointState (the same since Iron); ROS tools show it as the endpoint's type.
    expected = "RIHS01_a13ee3a330e346c9d87b5aa18d24e11690752bd33a0350f11c5882bc9179260e"
    assert dds.type_hash_user_data("sensor_msgs/msg/JointState") == f"typehash={expected};".encode()


def test_config_yaml_matches_the_dataclass():
    import yaml

    values = yaml.safe_load((ROOT / "configs/robot/ros2.yaml").read_text())
    values.pop("defaults")
    config = Ros2RobotConfig(**values)
    assert len(config.joint_names) == len(config.position_low) == 7
    with pytest.raises(ValueError, match="publish must be one of"):
        Ros2RobotConfig(joint_names=["a"], publish="topic")
    with pytest.raises(ValueError, match="joint_names must be non-empty and unique"):
        Ros2RobotConfig(joint_names=["a", "a"])
    with pytest.raises(ValueError, match="position_low must have one entry per joint"):
        Ros2RobotConfig(joint_names=["a", "b"], position_low=[0.0])


# ---- two processes: Ros2Robot here, a plain Cyclone DDS peer (deploy/ros2/peer.py) in a subprocess ------------------


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_bridge_exchanges_with_a_plain_dds_peer():
    domain = 100 + os.getpid() % 50  # 100..149, our own (tests/test_ros2_interop.py uses 150..199)
    peer = PeerProcess("cyclonedds", domain, ["j0", "j1", "j2"], rate=100.0, duration=20.0)
    # Our joint order differs from the publisher's: read() must reorder by name.
    limits = {"position_low": [-1.0] * 3, "position_high": [1.0] * 3}
    config = Ros2RobotConfig(
        joint_names=["j2", "j0", "j1"], publish="both", domain_id=domain, loopback_only=True, **limits
    )
    robot = Ros2Robot(config)
    try:
        peer.wait_for(lambda e: e["event"] == "ready", timeout=10)
        robot.start()
        obs = wait_for(robot.read, 10, "the first JointState")
        # The peer publishes position[i] = 0.1 * (i + 1) + 0.001 * count, stamped with the wall clock at publication.
        offset = obs.data["state"] - np.array([0.3, 0.1, 0.2])
        assert np.all(offset > -1e-9) and np.allclose(offset, offset[0]), obs.data
        age = time.monotonic() - obs.stamp
        assert -0.005 < age < 0.5, f"observation age {age:.4f} s (stamp converted from the ROS wall-clock header)"
        later = wait_for(lambda: (o := robot.read()) is not None and o.stamp > obs.stamp and o, 2, "a newer state")
        assert later.data["state"][0] > obs.data["state"][0]

        wait_for(lambda: robot.matched()["trajectory"] and robot.matched()["array"], 10, "the peer's command readers")
        now = time.monotonic()
        robot.command(np.array([0.5, -0.25, 2.0]), now)  # the last joint is clipped to position_high = 1.0
        event = peer.wait_for(lambda e: e["event"] == "trajectory", 5)
        assert event["joint_names"] == ["j2", "j0", "j1"]
        assert event["points"] == [[0.5, -0.25, 1.0]]
        assert event["time_from_start"] == pytest.approx([config.point_time_s])
        assert 0 <= event["recv_wall"] - (time.time() - (time.monotonic() - now)) < 0.5
        array = peer.wait_for(lambda e: e["event"] == "array", 5)
        assert array["data"] == [0.5, -0.25, 1.0] and array["dims"] == [["joints", 3, 3]]

        t0 = time.monotonic() + 0.05
        actions = np.linspace([0.0, 0.1, 0.2], [0.7, 0.8, 0.9], 8)
        robot.publish_chunk(TimedChunk(t0=t0, dt=0.1, actions=actions, t_obs=now))
        event = peer.wait_for(lambda e: e["event"] == "trajectory" and len(e["points"]) == 8, 5)
        assert np.allclose(event["points"], actions)
        assert event["time_from_start"] == pytest.approx(0.1 * np.arange(8))
        # The header stamp is the chunk's first action time on the ROS (wall) clock.
        assert event["stamp"] == pytest.approx(t0 + time.time() - time.monotonic(), abs=2e-3)
        array = peer.wait_for(lambda e: e["event"] == "array" and len(e["dims"]) == 2, 5)
        assert np.allclose(np.reshape(array["data"], (8, 3)), actions)
        assert array["dims"] == [["time", 8, 24], ["joints", 3, 3]]

        robot.stop()
        # An empty trajectory is JointTrajectoryController's stop; array mode holds the newest measured positions.
        peer.wait_for(lambda e: e["event"] == "trajectory" and e["points"] == [], 5)
        hold = peer.wait_for(
            lambda e: e["event"] == "array" and e["data"] != [0.5, -0.25, 1.0] and len(e["dims"]) == 1, 5
        )
        assert np.all(np.array(hold["data"]) >= obs.data["state"] - 1e-9)
    finally:
        robot.close()
        peer.close()


def test_deploy_loop_drives_a_ros2_robot_end_to_end(tmp_path):
    """A checkpoint through the inference process and the 50 Hz loop to a DDS peer standing in for the robot driver:
    JointState in, one JointTrajectory point per control tick out, within the configured limits."""
    import torch

    from deploy.loop import LoopConfig
    from deploy.run import deploy_robot
    from deploy.safety import Limits
    from policies.checkpoint import save_checkpoint
    from policies.registry import config_from_dict, make_policy

    torch.manual_seed(0)
    tiny = {"horizon": 8, "n_obs_steps": 2, "n_action_steps": 4, "down_dims": [8, 16], "diffusion_step_embed_dim": 8,
            "n_groups": 4, "num_inference_steps": 2}  # fmt: skip
    policy = make_policy(config_from_dict("diffusion_unet", tiny), {"obs": {"state": [2]}, "action": [2]})
    policy.fit_normalizer({"state": torch.rand(64, 2) - 0.5, "action": torch.rand(64, 2) * 0.4 - 0.2})
    checkpoint = save_checkpoint(policy, tmp_path / "ckpt")

    domain = 100 + (os.getpid() + 7) % 50
    peer = PeerProcess("cyclonedds", domain, ["a", "b"], rate=100.0, duration=30.0)
    config = Ros2RobotConfig(
        joint_names=["a", "b"], domain_id=domain, loopback_only=True, position_low=[-0.5] * 2, position_high=[0.5] * 2
    )
    limits = Limits(low=config.position_low, high=config.position_high, max_velocity=2.0)
    try:
        peer.wait_for(lambda e: e["event"] == "ready", timeout=10)
        summary = deploy_robot(
            checkpoint, lambda: Ros2Robot(config), LoopConfig(limits=limits), executor="chunk", max_duration_s=1.5,
            output_dir=tmp_path / "out",
        )  # fmt: skip
        assert summary["ended_by"] == "duration" and summary["final_state"] == "RUN", summary
        assert summary["chunks"] >= 5 and summary["watchdog_ticks"]["ESTOP"] == 0
        points = [e["points"] for e in list(peer.events) if e["event"] == "trajectory" and e["points"]]
        assert len(points) >= 30, f"{len(points)} trajectory commands in 1.5 s at 50 Hz"
        assert np.all(np.abs(np.array([p[0] for p in points])) <= 0.5 + 1e-9)
        assert (tmp_path / "out" / "ticks.json").exists()
    finally:
        peer.close()
