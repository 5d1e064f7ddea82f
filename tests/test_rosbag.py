"""ROS bag import (data/rosbag.py): small bags written with rosbags' own writers (ROS 1, ROS 2 sqlite3, ROS 2 mcap)
with known signals, read back onto a control-rate grid; expected values are computed here from the same stamps."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("rosbags", reason="ROS bag import needs rosbags (the ros2 extra)")
from rosbags.rosbag1 import Writer as Writer1  # noqa: E402
from rosbags.rosbag2 import StoragePlugin  # noqa: E402
from rosbags.rosbag2 import Writer as Writer2  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402

from data.rosbag import SUPPORTED_TYPES, import_rosbag  # noqa: E402

T0 = 1_700_000_000 * 10**9  # bag epoch, ns
MS = 10**6
KINDS = ("ros1", "ros2_sqlite3", "ros2_mcap")


class Bag:
    """Messages collected as ``(receive_ns, topic, msgtype, msg)`` and written with rosbags' writer for ``kind``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.store = get_typestore(Stores.ROS1_NOETIC if kind == "ros1" else Stores.ROS2_HUMBLE)
        self.messages: list[tuple[int, str, str, object]] = []

    def msg(self, msgtype: str, **fields) -> object:
        return self.store.types[msgtype](**fields)

    def header(self, stamp_ns: int) -> object:
        time = self.msg("builtin_interfaces/msg/Time", sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
        extra = {"seq": 0} if self.kind == "ros1" else {}  # ROS 1 headers carry a sequence number
        return self.msg("std_msgs/msg/Header", stamp=time, frame_id="", **extra)

    def add(self, receive_ns: int, topic: str, msgtype: str, **fields) -> None:
        self.messages.append((receive_ns, topic, msgtype, self.msg(msgtype, **fields)))

    def write(self, directory) -> object:
        if self.kind == "ros1":
            path = directory / "test.bag"
            writer, serialize = Writer1(path), self.store.serialize_ros1
        else:
            path = directory / "bag"
            plugin = StoragePlugin.SQLITE3 if self.kind == "ros2_sqlite3" else StoragePlugin.MCAP
            writer, serialize = Writer2(path, version=9, storage_plugin=plugin), self.store.serialize_cdr
        with writer:
            connections = {}
            for receive_ns, topic, msgtype, msg in sorted(self.messages, key=lambda m: m[0]):
                if topic not in connections:
                    connections[topic] = writer.add_connection(topic, msgtype, typestore=self.store)
                writer.write(connections[topic], receive_ns, serialize(msg, msgtype))
        return path


def joint_states(bag: Bag, stamps: list[int], delay_ns: int = 5 * MS) -> None:
    """Ramp position [0.5 + 2 t, -t], velocity [2, -1]; every other message lists the joints in reverse order."""
    for k, stamp in enumerate(stamps):
        t = (stamp - T0) * 1e-9
        names, pos, vel = ["j1", "j2"], [0.5 + 2.0 * t, -t], [2.0, -1.0]
        if k % 2:
            names, pos, vel = names[::-1], pos[::-1], vel[::-1]
        fields = dict(name=names, position=np.array(pos), velocity=np.array(vel), effort=np.zeros(0))
        bag.add(
            stamp + delay_ns + (k % 3) * MS,
            "/joint_states",
            "sensor_msgs/msg/JointState",
            header=bag.header(stamp),
            **fields,
        )


def frame(k: int) -> np.ndarray:
    """[4, 6, 3] RGB with the frame index painted in: R = k, G = 100 + k, B = 200."""
    return np.broadcast_to(np.array([k, 100 + k, 200], np.uint8), (4, 6, 3)).copy()


def camera(bag: Bag, stamps: list[int]) -> None:
    """15 Hz frames received 30 ms late: bgr8 (ROS 1), padded rgb8 rows (sqlite3), PNG CompressedImage (mcap)."""
    import imageio.v3 as iio

    for k, stamp in enumerate(stamps):
        header, receive = bag.header(stamp), stamp + 30 * MS
        if bag.kind == "ros1":
            data = frame(k)[..., ::-1].reshape(-1)
            bag.add(receive, "/camera", "sensor_msgs/msg/Image", header=header, height=4, width=6, encoding="bgr8",
                    is_bigendian=0, step=18, data=np.ascontiguousarray(data))  # fmt: skip
        elif bag.kind == "ros2_sqlite3":
            data = np.concatenate([frame(k).reshape(4, 18), np.full((4, 2), 77, np.uint8)], axis=1).reshape(-1)
            bag.add(receive, "/camera", "sensor_msgs/msg/Image", header=header, height=4, width=6, encoding="rgb8",
                    is_bigendian=0, step=20, data=data)  # fmt: skip
        else:
            png = np.frombuffer(iio.imwrite("<bytes>", frame(k), extension=".png"), np.uint8)
            bag.add(receive, "/camera", "sensor_msgs/msg/CompressedImage", header=header, format="png", data=png)


def float_array(bag: Bag, topic: str, receive_ns: int, values: list[float]) -> None:
    layout = bag.msg("std_msgs/msg/MultiArrayLayout", dim=[], data_offset=0)
    bag.add(receive_ns, topic, "std_msgs/msg/Float64MultiArray", layout=layout, data=np.array(values, np.float64))


def hold_index(stamps: list[int], grid: np.ndarray) -> np.ndarray:
    """Index of the newest stamp at or before each grid time (-1: none), by brute force."""
    return np.array([max((i for i, s in enumerate(stamps) if s <= t), default=-1) for t in grid])


@pytest.mark.parametrize("kind", KINDS)
def test_resamples_joint_ramp_images_and_commands(tmp_path, kind):
    bag = Bag(kind)
    joint_stamps = [T0 + 3 * MS + k * 20 * MS for k in range(100)]  # 50 Hz
    cam_stamps = [T0 + 50 * MS + round(k * 1e9 / 15) for k in range(30)]  # 15 Hz
    cmd_times = [T0 + 20 * MS + k * 100 * MS for k in range(20)]  # 10 Hz, no header: bag receive time
    joint_states(bag, joint_stamps)
    camera(bag, cam_stamps)
    for k, t in enumerate(cmd_times):
        float_array(bag, "/cmd", t, [k, -k])
    path = bag.write(tmp_path)

    topics = {"/joint_states": "state", "/camera": "image", "/cmd": "action"}
    buf = import_rosbag(path, topics, rate_hz=20.0, progress=False)

    # The grid starts when the last topic (camera, 50 ms) starts and ends at the earliest last message (cmd, 1.92 s).
    grid = T0 + 50 * MS + np.arange(38) * 50 * MS
    assert list(buf.episode_ends) == [38]
    assert sorted(buf.data) == ["action", "action_age", "image", "image_age", "state", "state_age", "state_velocity"]
    t = (grid - T0) * 1e-9
    # Linear interpolation of a ramp between header stamps is exact (receive times are 5-7 ms later and jittered).
    np.testing.assert_allclose(buf.data["state"], np.stack([0.5 + 2 * t, -t], 1), atol=2e-6)
    assert buf.data["state"].dtype == np.float32
    np.testing.assert_array_equal(buf.data["state_velocity"], np.tile([2.0, -1.0], (38, 1)))
    joint_before = np.array(joint_stamps)[hold_index(joint_stamps, grid)]
    np.testing.assert_allclose(buf.data["state_age"], (grid - joint_before) * 1e-9, atol=1e-7)
    # Zero-order hold picks the newest frame by header stamp (receive times are 30 ms later, which would differ).
    frames = hold_index(cam_stamps, grid)
    assert buf.data["image"].dtype == np.uint8 and buf.data["image"].shape == (38, 4, 6, 3)
    np.testing.assert_array_equal(buf.data["image"], np.stack([frame(k) for k in frames]))
    assert len(set(frames)) > 20 and (hold_index([s + 30 * MS for s in cam_stamps], grid) != frames).any()
    np.testing.assert_allclose(buf.data["image_age"], (grid - np.array(cam_stamps)[frames]) * 1e-9, atol=1e-7)
    cmds = hold_index(cmd_times, grid)
    np.testing.assert_array_equal(buf.data["action"], np.stack([cmds, -cmds], 1).astype(np.float32))
    np.testing.assert_allclose(buf.data["action_age"], (grid - np.array(cmd_times)[cmds]) * 1e-9, atol=1e-7)
    assert buf.data["action_age"].dtype == np.float32 and buf.data["action_age"].max() < 0.1


def ramp_bag(tmp_path, kind: str, markers: list[tuple[int, object]], marker_type: str = "std_msgs/msg/Bool"):
    """Joint ramp at 50 Hz for 3 s (stamps T0 + k * 20 ms) with no messages strictly between 1.2 s and 1.6 s."""
    bag = Bag(kind)
    joint_states(bag, [T0 + k * 20 * MS for k in range(150) if not 60 < k < 80])
    for time_ns, value in markers:
        bag.add(time_ns, "/episode", marker_type, data=value)
    return bag.write(tmp_path)


S = 10**9


@pytest.mark.parametrize(
    ("marker_type", "markers", "starts", "lengths"),
    [
        # Gap only: 0.0..1.2 s, then 1.6..2.9 s (the last stamp is 2.98 s).
        (None, [], [0.0, 1.6], [13, 14]),
        # Bool: True starts, a second True restarts, False ends (data after it is dropped); the gap splits too.
        ("std_msgs/msg/Bool", [(0.2, True), (0.8, True), (2.6, False)], [0.2, 0.8, 1.6], [6, 5, 10]),
        # Any other marker type: every message starts an episode.
        ("std_msgs/msg/String", [(0.2, "a"), (0.8, "b"), (2.6, "c")], [0.2, 0.8, 1.6, 2.6], [6, 5, 10, 4]),
    ],
)
def test_episodes_split_by_marker_topic_and_gaps(tmp_path, marker_type, markers, starts, lengths):
    path = ramp_bag(tmp_path, "ros2_mcap", [(T0 + round(t * S), v) for t, v in markers], marker_type or "")
    buf = import_rosbag(
        path,
        {"/joint_states": "q"},
        rate_hz=10,
        episode_topic=marker_type and "/episode",
        max_gap_s=0.1,
        progress=False,
    )
    assert list(buf.episode_lengths) == lengths
    for i, (start, n) in enumerate(zip(starts, lengths, strict=True)):
        t = start + 0.1 * np.arange(n)
        np.testing.assert_allclose(buf.get_episode(i)["q"], np.stack([0.5 + 2 * t, -t], 1), atol=2e-6)


def test_without_gap_limit_interpolates_across_the_gap_and_start_s_skips(tmp_path):
    path = ramp_bag(tmp_path, "ros1", [])
    buf = import_rosbag(path, {"/joint_states": "q"}, rate_hz=10, progress=False)
    assert list(buf.episode_lengths) == [30]
    assert buf.data["q_age"][14] == pytest.approx(0.2, abs=1e-6)  # 1.4 s: newest message is 1.2 s
    # start_s is on the bag (receive) clock, which starts 5 ms after the first stamp: the first kept stamp is 0.5 s.
    late = import_rosbag(path, {"/joint_states": "q"}, rate_hz=10, start_s=0.5, end_s=1.0, progress=False)
    np.testing.assert_allclose(late.data["q"][:, 0], 0.5 + 2 * (0.5 + 0.1 * np.arange(5)), atol=2e-6)


def test_pose_twist_and_trajectory(tmp_path):
    bag = Bag("ros2_sqlite3")
    for k in range(11):  # 10 Hz; the quaternion's sign alternates (same rotation), which must not break interpolation
        stamp, angle = T0 + k * 100 * MS, 0.1 * k
        q = (-1) ** k * np.array([0.0, 0.0, math.sin(angle / 2), math.cos(angle / 2)])
        vec = lambda m, x, y, z: bag.msg(f"geometry_msgs/msg/{m}", x=x, y=y, z=z)  # noqa: E731
        orientation = bag.msg("geometry_msgs/msg/Quaternion", x=q[0], y=q[1], z=q[2], w=q[3])
        pose = bag.msg("geometry_msgs/msg/Pose", position=vec("Point", k, 2 * k, 0.0), orientation=orientation)
        bag.add(stamp, "/pose", "geometry_msgs/msg/PoseStamped", header=bag.header(stamp), pose=pose)
        twist = bag.msg("geometry_msgs/msg/Twist", linear=vec("Vector3", k, 0.0, 0.0), angular=vec("Vector3", 0, 0, -k))
        bag.add(stamp, "/twist", "geometry_msgs/msg/TwistStamped", header=bag.header(stamp), twist=twist)
        # A command with an unset (zero) stamp: placed at its receive time; joints listed in changing order.
        point = bag.msg("trajectory_msgs/msg/JointTrajectoryPoint", positions=np.array([k, 10.0 + k][:: (-1) ** k]),
                        velocities=np.zeros(0), accelerations=np.zeros(0), effort=np.zeros(0),
                        time_from_start=bag.msg("builtin_interfaces/msg/Duration", sec=0, nanosec=0))  # fmt: skip
        names = ["a", "b"][:: (-1) ** k]
        bag.add(stamp + 30 * MS, "/traj", "trajectory_msgs/msg/JointTrajectory", header=bag.header(0),
                joint_names=names, points=[point])  # fmt: skip
    path = bag.write(tmp_path)

    buf = import_rosbag(path, {"/pose": "pose", "/twist": "twist", "/traj": "cmd"}, rate_hz=20, progress=False)
    t = 0.03 + 0.05 * np.arange(20)  # from the first command (30 ms) to the last pose/twist (1.0 s)
    assert list(buf.episode_ends) == [len(t)]
    k = t / 0.1  # message index, fractional
    angle = 0.1 * k
    expected_pose = np.stack([k, 2 * k, 0 * k, 0 * k, 0 * k, np.sin(angle / 2), np.cos(angle / 2)], 1)
    # Normalized linear interpolation equals slerp at messages and midpoints; elsewhere it is within 1e-4 here.
    np.testing.assert_allclose(buf.data["pose"], expected_pose, atol=2e-4)
    np.testing.assert_allclose(np.linalg.norm(buf.data["pose"][:, 3:], axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(buf.data["twist"], np.stack([k, 0 * k, 0 * k, 0 * k, 0 * k, -k], 1), atol=2e-5)
    held = np.floor((t - 0.03) / 0.1 + 1e-9)
    np.testing.assert_array_equal(buf.data["cmd"], np.stack([held, 10 + held], 1).astype(np.float32))


@pytest.fixture
def sqlite_bag(tmp_path):
    bag = Bag("ros2_sqlite3")
    joint_states(bag, [T0 + k * 20 * MS for k in range(50)])
    for k in range(5):
        bag.add(T0 + k * 200 * MS, "/note", "std_msgs/msg/String", data=f"note {k}")
    for t, value in [(0.1, True), (0.5, False), (5.0, True)]:  # the second episode starts after the data ends
        bag.add(T0 + round(t * S), "/episode", "std_msgs/msg/Bool", data=value)
    return bag.write(tmp_path)


def test_bad_input_errors_name_the_problem(tmp_path, sqlite_bag):
    with pytest.raises(
        ValueError, match=r"topic /joint_state is not in .*'/joint_states': 'sensor_msgs/msg/JointState'"
    ):
        import_rosbag(sqlite_bag, {"/joint_state": "q"}, rate_hz=10, progress=False)
    with pytest.raises(
        ValueError, match=r"topic /note has unsupported type std_msgs/msg/String; supported: .*JointState"
    ):
        import_rosbag(sqlite_bag, {"/note": "note"}, rate_hz=10, progress=False)
    assert "sensor_msgs/msg/CompressedImage" in SUPPORTED_TYPES
    for rate in (0, -5.0, float("nan")):
        with pytest.raises(ValueError, match="rate_hz must be a positive number"):
            import_rosbag(sqlite_bag, {"/joint_states": "q"}, rate_hz=rate, progress=False)
    with pytest.raises(ValueError, match=r"episode 1 .* is empty: no grid point where every topic"):
        import_rosbag(sqlite_bag, {"/joint_states": "q"}, rate_hz=10, episode_topic="/episode", progress=False)
    with pytest.raises(ValueError, match="is not a readable ROS bag"):
        import_rosbag(tmp_path, {"/joint_states": "q"}, rate_hz=10, progress=False)
    with pytest.raises(ValueError, match="max_gap_s must be positive"):
        import_rosbag(sqlite_bag, {"/joint_states": "q"}, rate_hz=10, max_gap_s=0, progress=False)


def test_bad_message_contents(tmp_path):
    bag = Bag("ros2_mcap")
    bag.add(T0, "/depth", "sensor_msgs/msg/Image", header=bag.header(T0), height=2, width=2, encoding="16UC1",
            is_bigendian=0, step=4, data=np.zeros(8, np.uint8))  # fmt: skip
    for k, names in enumerate([["a", "b"], ["a", "c"]]):  # the second message names another joint
        bag.add(T0 + k * MS, "/joints", "sensor_msgs/msg/JointState", header=bag.header(T0 + k * MS), name=names,
                position=np.zeros(2), velocity=np.zeros(0), effort=np.zeros(0))  # fmt: skip
    path = bag.write(tmp_path)
    with pytest.raises(ValueError, match=r"/depth: encoding '16UC1' unsupported; expected one of \['rgb8'"):
        import_rosbag(path, {"/depth": "depth"}, rate_hz=10, progress=False)
    with pytest.raises(ValueError, match=r"/joints: a message has joints \['a', 'c'\]; expected \['a', 'b'\]"):
        import_rosbag(path, {"/joints": "q"}, rate_hz=10, progress=False)
