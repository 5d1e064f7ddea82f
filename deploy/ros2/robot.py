"""A ROS 2 robot behind deploy.types.Robot, spoken to directly over DDS (cyclonedds; no ROS installation).

- read(): the newest ``sensor_msgs/JointState`` (positions in the configured joint order) and, if configured, the
  newest ``sensor_msgs/Image``. The ROS stamp (wall clock) becomes monotonic seconds through the offset
  ``time.time() - time.monotonic()`` taken at read time; a zero header stamp falls back to the DDS source timestamp.
- command(): ``trajectory_msgs/JointTrajectory`` with one point (header stamp 0 = "start when received", as
  ros2_control's JointTrajectoryController reads it; the point is due ``point_time_s`` later) and/or
  ``std_msgs/Float64MultiArray`` (a ForwardCommandController's input). publish_chunk() sends a whole TimedChunk as
  one trajectory stamped at the chunk's first action time, points at ``i * dt``.
- stop(): an empty JointTrajectory, which makes JointTrajectoryController drop its trajectory and hold position; in
  array mode the newest measured positions are sent as the hold target.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from cyclonedds.pub import DataWriter
from cyclonedds.sub import DataReader
from cyclonedds.topic import Topic

from deploy.ros2 import dds, msgs
from deploy.types import Observation, TimedChunk

PUBLISH_MODES = ("trajectory", "array", "both")


@dataclasses.dataclass
class Ros2RobotConfig:
    """Topics, joints, limits, QoS and domain of a ROS 2 robot (configs/robot/ros2.yaml)."""

    joint_names: list[str]
    joint_state_topic: str = "/joint_states"
    trajectory_topic: str = "/joint_trajectory_controller/joint_trajectory"
    array_topic: str = "/forward_position_controller/commands"
    publish: str = "trajectory"
    # Per-joint limits in raw units (rad, rad/s); the control loop's deploy.safety.Limits enforces them, the bridge
    # only clips positions once more as a last guard.
    position_low: list[float] | None = None
    position_high: list[float] | None = None
    max_velocity: list[float] | None = None
    point_time_s: float = 0.02
    frame_id: str = ""
    state_qos: str = "sensor"
    command_qos: str = "default"
    domain_id: int | None = None
    loopback_only: bool = True
    obs_key: str = "state"
    image_topic: str | None = None
    image_shape: list[int] | None = None
    image_key: str = "image"

    def __post_init__(self) -> None:
        self.joint_names = list(self.joint_names)
        if not self.joint_names or len(set(self.joint_names)) != len(self.joint_names):
            raise ValueError(f"joint_names must be non-empty and unique, got {self.joint_names}")
        if self.publish not in PUBLISH_MODES:
            raise ValueError(f"publish must be one of {PUBLISH_MODES}, got {self.publish!r}")
        for name in ("position_low", "position_high", "max_velocity"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.joint_names):
                raise ValueError(f"{name} must have one entry per joint ({len(self.joint_names)}), got {value}")
        both = self.position_low is not None and self.position_high is not None
        if both and np.any(np.asarray(self.position_low) > np.asarray(self.position_high)):
            raise ValueError(f"position_low must be <= position_high, got {self.position_low} / {self.position_high}")
        if not self.point_time_s > 0:
            raise ValueError(f"point_time_s must be > 0, got {self.point_time_s}")
        for name in ("state_qos", "command_qos"):
            if getattr(self, name) not in dds.QOS_PROFILES:
                raise ValueError(f"{name} must be one of {dds.QOS_PROFILES}, got {getattr(self, name)!r}")
        for name in ("joint_state_topic", "trajectory_topic", "array_topic"):
            dds.dds_topic(getattr(self, name))
        dds.resolve_domain_id(self.domain_id)
        if (self.image_topic is None) != (self.image_shape is None):
            raise ValueError(f"image_topic and image_shape go together, got {self.image_topic!r}, {self.image_shape}")
        if self.image_shape is not None and (len(self.image_shape) != 3 or min(self.image_shape) < 1):
            raise ValueError(f"image_shape must be [height, width, channels] >= 1, got {self.image_shape}")


class Ros2Robot:
    """deploy.types.Robot over DDS. ``start()`` opens the participant; ``close()`` releases it."""

    def __init__(self, config: Ros2RobotConfig) -> None:
        self.config = config
        self.action_dim = len(config.joint_names)
        self.incomplete_states = 0  # JointState messages that lacked a configured joint (ignored)
        self._low = None if config.position_low is None else np.asarray(config.position_low, dtype=np.float64)
        self._high = None if config.position_high is None else np.asarray(config.position_high, dtype=np.float64)
        self._domain = self._participant = None
        self._latest: Observation | None = None
        self._latest_image: np.ndarray | None = None
        self._order: tuple[tuple[str, ...], np.ndarray | None] = ((), None)

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        c = self.config
        self._domain, self._participant = dds.open_participant(dds.resolve_domain_id(c.domain_id), c.loopback_only)

        def reader(topic: str, idl_type: type, profile: str) -> DataReader:
            # A control loop wants only the newest sample: keep-last 1 (ros2-over-dds notes).
            q = dds.qos(profile, depth=1, user_data=dds.type_hash_user_data(msgs.ros_type_name(idl_type)))
            return DataReader(self._participant, Topic(self._participant, dds.dds_topic(topic), idl_type), qos=q)

        def writer(topic: str, idl_type: type) -> DataWriter:
            q = dds.qos(c.command_qos, user_data=dds.type_hash_user_data(msgs.ros_type_name(idl_type)))
            return DataWriter(self._participant, Topic(self._participant, dds.dds_topic(topic), idl_type), qos=q)

        self._state_reader = reader(c.joint_state_topic, msgs.JointState, c.state_qos)
        self._image_reader = None
        if c.image_topic is not None:
            self._image_reader = reader(c.image_topic, msgs.image_type(*c.image_shape), "sensor")
        self._trajectory_writer = writer(c.trajectory_topic, msgs.JointTrajectory) if c.publish != "array" else None
        self._array_writer = writer(c.array_topic, msgs.Float64MultiArray) if c.publish != "trajectory" else None

    def close(self) -> None:
        # Dropping the entities deletes them in Cyclone; the participant before its domain.
        for name in ("_state_reader", "_image_reader", "_trajectory_writer", "_array_writer", "_participant"):
            setattr(self, name, None)
        self._domain = None

    def matched(self) -> dict[str, int]:
        """How many remote endpoints each of our readers/writers has matched (discovery progress)."""
        self._require_started()
        out = {"joint_states": len(self._state_reader.get_matched_publications())}
        if self._trajectory_writer is not None:
            out["trajectory"] = len(self._trajectory_writer.get_matched_subscriptions())
        if self._array_writer is not None:
            out["array"] = len(self._array_writer.get_matched_subscriptions())
        if self._image_reader is not None:
            out["image"] = len(self._image_reader.get_matched_publications())
        return out

    # ---- observations ----------------------------------------------------------------------------------------
    def read(self) -> Observation | None:
        self._require_started()
        offset = time.time() - time.monotonic()
        for sample in self._state_reader.take(N=16):
            positions = self._in_joint_order(sample.name, sample.position)
            if positions is None:
                self.incomplete_states += 1
                continue
            wall = msgs.to_seconds(sample.header.stamp) or sample.sample_info.source_timestamp * 1e-9
            self._latest = Observation(data={self.config.obs_key: positions}, stamp=wall - offset)
        if self._image_reader is not None:
            images = self._image_reader.take(N=4)
            if images:
                h, w, ch = self.config.image_shape
                self._latest_image = np.frombuffer(images[-1].data, dtype=np.uint8).reshape(h, w, ch)
            if self._latest_image is None:
                return None
        if self._latest is None:
            return None
        data = dict(self._latest.data)
        if self._latest_image is not None:
            data[self.config.image_key] = self._latest_image
        return Observation(data=data, stamp=self._latest.stamp)

    def _in_joint_order(self, names: list[str], position: list[float]) -> np.ndarray | None:
        """``position`` reordered to ``config.joint_names`` (None if a joint is missing); the index map is cached
        per distinct name list because drivers send the same list every time."""
        key = tuple(names)
        if key != self._order[0]:
            lookup = {n: i for i, n in enumerate(key)}
            missing = [n for n in self.config.joint_names if n not in lookup]
            index = None if missing else np.array([lookup[n] for n in self.config.joint_names])
            self._order = (key, index)
        index = self._order[1]
        if index is None or len(position) != len(names):
            return None
        return np.asarray(position, dtype=np.float64)[index]

    # ---- commands --------------------------------------------------------------------------------------------
    def command(self, target: np.ndarray, stamp: float) -> None:
        """One position target ``[Da]`` for monotonic time ``stamp`` (the controller reaches it ``point_time_s``
        after it receives it: JointTrajectoryController has no notion of our clock for a single point)."""
        target = np.asarray(target, dtype=np.float64)[None]
        self.publish_chunk(TimedChunk(t0=stamp, dt=self.config.point_time_s, actions=target, t_obs=stamp))

    def publish_chunk(self, chunk: TimedChunk) -> None:
        """A timestamped chunk ``[n, Da]`` as one JointTrajectory (and/or a ``[n, Da]`` Float64MultiArray)."""
        self._require_started()
        actions = self._checked(chunk.actions)
        if self._trajectory_writer is not None:
            if len(actions) == 1:
                # Header stamp 0 = start on receipt; the single point is due point_time_s later.
                header, starts = msgs.Header(frame_id=self.config.frame_id), [self.config.point_time_s]
            else:
                # The chunk's action i is due at t0 + i * dt: stamp the trajectory at t0 (monotonic -> wall).
                wall_t0 = chunk.t0 + time.time() - time.monotonic()
                header = msgs.Header(stamp=msgs.time_msg(wall_t0), frame_id=self.config.frame_id)
                starts = (chunk.dt * np.arange(len(actions))).tolist()
            points = [
                msgs.JointTrajectoryPoint(positions=a.tolist(), time_from_start=msgs.duration_msg(s))
                for a, s in zip(actions, starts, strict=True)
            ]
            self._trajectory_writer.write(
                msgs.JointTrajectory(header=header, joint_names=self.config.joint_names, points=points)
            )
        if self._array_writer is not None:
            array = actions[0] if len(actions) == 1 else actions
            labels = ("joints",) if len(actions) == 1 else ("time", "joints")
            self._array_writer.write(msgs.float64_array(array, labels))

    def stop(self) -> None:
        self._require_started()
        if self._trajectory_writer is not None:
            self._trajectory_writer.write(msgs.JointTrajectory(joint_names=self.config.joint_names, points=[]))
        if self._array_writer is not None and self._latest is not None:
            self._array_writer.write(msgs.float64_array(self._latest.data[self.config.obs_key], ("joints",)))

    def _checked(self, actions: np.ndarray) -> np.ndarray:
        if actions.shape[1] != self.action_dim:
            raise ValueError(f"command needs {self.action_dim} joint targets, got shape {actions.shape}")
        if not np.all(np.isfinite(actions)):
            raise ValueError(f"command targets must be finite, got {actions}")
        if self._low is not None:
            actions = np.maximum(actions, self._low)
        if self._high is not None:
            actions = np.minimum(actions, self._high)
        return actions

    def _require_started(self) -> None:
        if self._participant is None:
            raise RuntimeError("Ros2Robot is not started: call start() first")
