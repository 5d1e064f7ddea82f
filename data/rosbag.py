"""Import ROS bags into a ReplayBuffer on a fixed control-rate grid.

Reads ROS 1 ``.bag`` files and ROS 2 bags (a directory with ``metadata.yaml``, or its ``.db3`` / ``.mcap`` file)
with rosbags' ``AnyReader`` (https://ternaris.gitlab.io/rosbags/topics/highlevel.html). It deserializes with the message
definitions stored in the bag; ROS 2 bags recorded without them fall back to the Humble type store.

Time. Each message is placed at its ``header.stamp``, the time its data was captured; the bag's receive time adds
transport and queueing delay that differs per topic. Messages without a header (std_msgs ``Float64MultiArray``,
``Float32MultiArray``, ``Float64``, episode markers) and messages whose stamp is zero (the publisher left it unset)
are placed at the bag receive time. Times are int64 nanoseconds until the last step.

Resampling onto the grid ``t_k = t_start + k / rate_hz`` of each episode:
- images (sensor_msgs ``Image``, ``CompressedImage`` -> uint8 ``[H, W, 3]`` RGB) and commands (std_msgs arrays,
  trajectory_msgs ``JointTrajectory``: its first point's positions) use zero-order hold: the newest message stamped
  at or before ``t_k``;
- measured signals (sensor_msgs ``JointState`` position, plus ``<key>_velocity`` when every message carries
  velocities; geometry_msgs ``PoseStamped`` -> ``[x, y, z, qx, qy, qz, qw]``, ``TwistStamped`` and
  ``WrenchStamped`` -> ``[6]``) are interpolated linearly between the messages around ``t_k``, which looks ahead by
  less than one message period of that topic. Quaternions use normalized linear interpolation on a sign-continuous
  sequence. Joint columns are sorted by joint name: bags whose publishers order joints differently agree.
``<key>_age`` ``[N]`` float32 is ``t_k`` minus the stamp of the newest message at or before ``t_k`` (seconds).

No extrapolation: grid points exist only between the latest first stamp and the earliest last stamp over the chosen
topics, so the points before every topic has published are dropped (and likewise at the end).

Episodes. ``episode_topic`` of type std_msgs ``Bool``: True starts an episode (a second True starts the next one),
False ends it and the time until the next True is dropped. A marker topic of any other type (``Empty``, ``String``,
...): each message starts a new episode. Data before the first marker is dropped. ``max_gap_s``: where any chosen
topic has two consecutive messages further apart than this, the grid points between them are dropped and the
episode is split there. Each episode's grid starts at the episode's first valid time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.replay_buffer import ReplayBuffer

# sensor_msgs/Image encoding -> (channels, channel index giving RGB); slices are views, faster than index lists.
_RAW_ENCODINGS = {
    "rgb8": (3, slice(0, 3)),
    "bgr8": (3, slice(2, None, -1)),
    "rgba8": (4, slice(0, 3)),
    "bgra8": (4, slice(2, None, -1)),
    "mono8": (1, [0, 0, 0]),
}


def _stamp_ns(msg: object) -> int | None:
    """``header.stamp`` in nanoseconds; None without a header or when the stamp is zero (unset)."""
    header = getattr(msg, "header", None)
    if header is None:
        return None
    stamp = int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)
    return stamp or None


def _joints(msg: object) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    return tuple(msg.name), np.asarray(msg.position, np.float64), np.asarray(msg.velocity, np.float64)


def _trajectory(msg: object) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    if not msg.points:
        raise ValueError("trajectory_msgs/msg/JointTrajectory message without points; expected at least one")
    return tuple(msg.joint_names), np.asarray(msg.points[0].positions, np.float64), np.zeros(0)


def _vec3(v: object) -> list[float]:
    return [v.x, v.y, v.z]


def _pose(msg: object) -> np.ndarray:
    p, q = msg.pose.position, msg.pose.orientation
    return np.array([p.x, p.y, p.z, q.x, q.y, q.z, q.w])


# msgtype -> (extract(msg) -> value, interpolate linearly?). Measurements are interpolated; commands are held, as a
# controller keeps executing the last command until the next. JointState-like values are (names, position, velocity).
_NUMERIC: dict[str, tuple[Callable[[object], object], bool]] = {
    "sensor_msgs/msg/JointState": (_joints, True),
    "geometry_msgs/msg/PoseStamped": (_pose, True),
    "geometry_msgs/msg/TwistStamped": (lambda m: np.array(_vec3(m.twist.linear) + _vec3(m.twist.angular)), True),
    "geometry_msgs/msg/WrenchStamped": (lambda m: np.array(_vec3(m.wrench.force) + _vec3(m.wrench.torque)), True),
    "std_msgs/msg/Float64MultiArray": (lambda m: np.asarray(m.data, np.float64), False),
    "std_msgs/msg/Float32MultiArray": (lambda m: np.asarray(m.data, np.float64), False),
    "std_msgs/msg/Float64": (lambda m: np.array([m.data], np.float64), False),
    "trajectory_msgs/msg/JointTrajectory": (_trajectory, False),
}
_IMAGES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
SUPPORTED_TYPES = tuple(sorted([*_NUMERIC, *_IMAGES]))


def decode_image(msg: object, topic: str) -> np.ndarray:
    """sensor_msgs ``Image`` (rgb8, bgr8, rgba8, bgra8, mono8) or ``CompressedImage`` -> uint8 ``[H, W, 3]`` RGB."""
    if hasattr(msg, "encoding"):  # sensor_msgs/msg/Image
        if msg.encoding not in _RAW_ENCODINGS:
            raise ValueError(f"{topic}: encoding '{msg.encoding}' unsupported; expected one of {[*_RAW_ENCODINGS]}")
        channels, order = _RAW_ENCODINGS[msg.encoding]
        rows = np.asarray(msg.data, np.uint8).reshape(msg.height, msg.step)  # rows may be padded to `step` bytes
        pixels = rows[:, : msg.width * channels].reshape(msg.height, msg.width, channels)
        return np.ascontiguousarray(pixels[..., order])
    if "compressedDepth" in msg.format:
        raise ValueError(f"{topic}: compressedDepth images unsupported; expected colour or mono JPEG/PNG")
    import imageio.v3 as iio  # Pillow decodes JPEG and PNG; image_transport's JPEGs hold RGB colours

    pixels = iio.imread(bytes(msg.data))
    if pixels.dtype != np.uint8:
        raise ValueError(f"{topic}: compressed image decodes to {pixels.dtype}; expected 8-bit colour or mono")
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return np.ascontiguousarray(pixels[..., [0, 0, 0] if pixels.shape[-1] < 3 else slice(0, 3)])


@dataclass
class _Series:
    """Messages of one topic: ``stamps [N]`` int64 ns (sorted after ``finish``) and per-message values."""

    topic: str
    key: str
    msgtype: str
    stamps: list[int] | np.ndarray = field(default_factory=list)
    values: list = field(default_factory=list)

    @property
    def linear(self) -> bool:
        return self.msgtype in _NUMERIC and _NUMERIC[self.msgtype][1]

    def add(self, msg: object, receive_ns: int) -> None:
        stamp = _stamp_ns(msg)
        self.stamps.append(receive_ns if stamp is None else stamp)
        self.values.append(msg if self.msgtype in _IMAGES else _NUMERIC[self.msgtype][0](msg))

    def finish(self) -> dict[str, np.ndarray | list]:
        """Sort by stamp (keeping the last received of equal stamps) and stack: ``{key: [N, D] float64 or list}``."""
        if not self.stamps:
            raise ValueError(f"topic {self.topic} has no messages in the chosen time range")
        stamps = np.asarray(self.stamps, np.int64)
        order = np.argsort(stamps, kind="stable")
        keep = np.append(stamps[order][1:] != stamps[order][:-1], True)
        order = order[keep]
        self.stamps, values = stamps[order], [self.values[i] for i in order]
        if self.msgtype in _IMAGES:
            return {self.key: values}
        if isinstance(values[0], tuple):
            return self._by_joint_name(values)
        return {self.key: self._stack(values)}

    def _stack(self, values: list[np.ndarray]) -> np.ndarray:
        sizes = {len(v) for v in values}
        if len(sizes) != 1:
            raise ValueError(f"{self.topic}: messages have different lengths {sorted(sizes)}; expected one length")
        out = np.stack(values)
        if self.msgtype == "geometry_msgs/msg/PoseStamped":
            # q and -q are the same rotation: flip signs so neighbours lie in one hemisphere before interpolating.
            flips = np.cumsum(np.sum(out[1:, 3:] * out[:-1, 3:], axis=1) < 0) % 2
            out[1:, 3:] *= np.where(flips, -1.0, 1.0)[:, None]
        return out

    def _by_joint_name(self, values: list[tuple]) -> dict[str, np.ndarray]:
        names = tuple(sorted(values[0][0]))
        positions, velocities = [], []
        for msg_names, position, velocity in values:
            if set(msg_names) != set(names) or len(position) != len(names):
                raise ValueError(f"{self.topic}: a message has joints {list(msg_names)}; expected {list(names)}")
            index = [msg_names.index(n) for n in names]
            positions.append(position[index])
            velocities.append(velocity[index] if len(velocity) == len(names) else None)
        out = {self.key: np.stack(positions)}
        if all(v is not None for v in velocities):
            out[f"{self.key}_velocity"] = np.stack(velocities)
        return out

    def sample(self, arrays: dict[str, np.ndarray | list], grid: np.ndarray) -> dict[str, np.ndarray]:
        """Values at ``grid [T]`` (ns, within the stamps): ``{key: [T, ...], <key>_age: [T]}``."""
        before = np.searchsorted(self.stamps, grid, side="right") - 1  # newest message at or before t
        out = {f"{self.key}_age": ((grid - self.stamps[before]) * 1e-9).astype(np.float32)}
        after = np.minimum(before + 1, len(self.stamps) - 1)
        span = (self.stamps[after] - self.stamps[before]).astype(np.float64)
        w = np.divide((grid - self.stamps[before]).astype(np.float64), span, out=np.zeros(len(grid)), where=span > 0)
        for key, values in arrays.items():
            if isinstance(values, list):  # images: decode each chosen frame once
                frames = {i: decode_image(values[i], self.topic) for i in np.unique(before)}
                shapes = {f.shape for f in frames.values()}
                if len(shapes) != 1:
                    raise ValueError(f"{self.topic}: images have different shapes {sorted(shapes)}; expected one")
                out[key] = np.stack([frames[i] for i in before])
            elif self.linear:
                v = values[before] + w[:, None] * (values[after] - values[before])
                if self.msgtype == "geometry_msgs/msg/PoseStamped":
                    v[:, 3:] /= np.linalg.norm(v[:, 3:], axis=1, keepdims=True)
                out[key] = v.astype(np.float32)
            else:
                out[key] = values[before].astype(np.float32)
        return out


def _episode_intervals(markers: list[tuple[int, object]], msgtype: str) -> list[tuple[int, float, bool]]:
    """``(start_ns, end_ns, end_open)`` per episode from marker messages ``(time_ns, msg)`` sorted by time."""
    intervals, start = [], None
    for t, msg in markers:
        if start is not None and t > start:  # every marker ends the running episode
            intervals.append((start, t, True))
        start = t if msgtype != "std_msgs/msg/Bool" or msg.data else None
    if start is not None:
        intervals.append((start, math.inf, False))
    return intervals


def _subtract_gaps(intervals: list, gaps: Iterable[tuple[int, int]]) -> list:
    """Remove the open intervals ``gaps`` (between two messages of a topic) from ``[start, end]`` intervals."""
    for g_lo, g_hi in gaps:
        out = []
        for lo, hi, open_hi in intervals:
            if g_lo >= hi or g_hi <= lo:
                out.append((lo, hi, open_hi))
                continue
            if g_lo >= lo:
                out.append((lo, g_lo, False))
            if g_hi < hi or (g_hi == hi and not open_hi):
                out.append((g_hi, hi, open_hi))
        intervals = out
    return intervals


def _grid(lo: int, hi: float, open_hi: bool, rate_hz: float) -> np.ndarray:
    """``[T]`` int64 ns: ``lo + k / rate_hz`` up to ``hi``; computed from k (no accumulated rounding)."""
    k = np.arange(int((hi - lo) * rate_hz * 1e-9) + 2)
    t = lo + np.round(k * (1e9 / rate_hz)).astype(np.int64)
    return t[(t < hi) if open_hi else (t <= hi)]


def _read(
    path: Path,
    topics: Mapping[str, str],
    episode_topic: str | None,
    start_s: float | None,
    end_s: float | None,
    progress: bool,
) -> tuple[dict[str, _Series], list[tuple[int, object]], str | None]:
    """Read the chosen topics: ``({topic: series}, [(time_ns, marker message)], marker msgtype)``."""
    from rosbags.highlevel import AnyReader, AnyReaderError
    from rosbags.typesys import Stores, get_typestore

    if not path.exists():
        raise FileNotFoundError(f"no ROS bag at {path}")
    try:
        reader = AnyReader([path], default_typestore=get_typestore(Stores.ROS2_HUMBLE))
        reader.open()
    except (AnyReaderError, FileNotFoundError) as err:  # a directory without metadata.yaml is the latter
        raise ValueError(f"{path} is not a readable ROS bag (ROS 1 .bag file or ROS 2 bag directory): {err}") from err
    try:
        available = {t: info.msgtype for t, info in reader.topics.items()}
        wanted = [*topics, *([episode_topic] if episode_topic else [])]
        if missing := [t for t in wanted if t not in available]:
            raise ValueError(f"topic {missing[0]} is not in {path}; its topics are {available}")
        for topic in topics:
            if available[topic] not in SUPPORTED_TYPES:
                raise ValueError(f"topic {topic} has unsupported type {available[topic]}; supported: {SUPPORTED_TYPES}")
        series = {t: _Series(t, key, available[t]) for t, key in topics.items()}
        markers: list[tuple[int, object]] = []
        start = None if start_s is None else reader.start_time + round(start_s * 1e9)
        stop = None if end_s is None else reader.start_time + round(end_s * 1e9)
        messages = reader.messages([c for c in reader.connections if c.topic in wanted], start=start, stop=stop)
        total = sum(reader.topics[t].msgcount for t in wanted)
        for conn, receive_ns, raw in tqdm(messages, total=total, desc="reading bag", disable=not progress):
            msg = reader.deserialize(raw, conn.msgtype)
            if conn.topic == episode_topic:
                markers.append((_stamp_ns(msg) or receive_ns, msg))
            else:
                series[conn.topic].add(msg, receive_ns)
    finally:
        reader.close()
    return series, markers, available.get(episode_topic)


def import_rosbag(
    path: str | Path,
    topics: Mapping[str, str],
    rate_hz: float,
    *,
    episode_topic: str | None = None,
    max_gap_s: float | None = None,
    start_s: float | None = None,
    end_s: float | None = None,
    progress: bool = True,
) -> ReplayBuffer:
    """Resample ``topics`` ({topic: key}) of a ROS 1 or ROS 2 bag onto a ``rate_hz`` grid, one episode per marked or
    gap-free span (module docstring). ``start_s``/``end_s`` keep the messages received within that many seconds
    after the bag's first message. Returns ``data[key]: [N, ...]`` (float32; images uint8 ``[N, H, W, 3]``), plus
    ``data[<key>_age]: [N]`` float32 seconds."""
    if not (isinstance(rate_hz, (int, float)) and math.isfinite(rate_hz) and rate_hz > 0):
        raise ValueError(f"rate_hz must be a positive number, got {rate_hz}")
    if max_gap_s is not None and not max_gap_s > 0:
        raise ValueError(f"max_gap_s must be positive, got {max_gap_s}")
    if not topics:
        raise ValueError("topics is empty; expected a mapping {topic: key}, e.g. {'/joint_states': 'state'}")
    if len(set(topics.values())) != len(topics):
        raise ValueError(f"topics map two topics to one key: {dict(topics)}")
    if episode_topic in topics:
        raise ValueError(f"episode_topic {episode_topic} is also a data topic; expected a separate marker topic")
    series, markers, marker_type = _read(Path(path), topics, episode_topic, start_s, end_s, progress)

    arrays = {t: s.finish() for t, s in series.items()}
    first = max(int(s.stamps[0]) for s in series.values())
    last = min(int(s.stamps[-1]) for s in series.values())
    if first > last:
        raise ValueError(f"the chosen topics {list(topics)} never all have data at the same time; nothing to resample")
    if episode_topic is None:
        episodes = [(first, last, False)]
    else:
        episodes = _episode_intervals(sorted(markers, key=lambda m: m[0]), marker_type)
        if not episodes:
            raise ValueError(f"episode topic {episode_topic} ({len(markers)} messages) starts no episode")
    gaps = []
    if max_gap_s is not None:
        for s in series.values():
            jumps = np.flatnonzero(np.diff(s.stamps) > max_gap_s * 1e9)
            gaps += [(int(s.stamps[i]), int(s.stamps[i + 1])) for i in jumps]

    buffer = ReplayBuffer()
    for index, (lo, hi, open_hi) in enumerate(episodes):
        clipped = (max(lo, first), min(hi, last), open_hi and hi <= last)
        pieces = _subtract_gaps([clipped] if clipped[0] <= clipped[1] else [], sorted(gaps))
        grids = [g for piece in pieces if len(g := _grid(*piece, rate_hz))]
        if not grids:
            raise ValueError(
                f"episode {index} ({(lo - first) * 1e-9:+.3f} s to {(hi - first) * 1e-9:+.3f} s from the time all "
                f"topics have data) is empty: no grid point where every topic in {list(topics)} has data"
            )
        for grid in grids:
            episode: dict[str, np.ndarray] = {}
            for topic, s in series.items():
                for key, value in s.sample(arrays[topic], grid).items():
                    if key in episode:
                        raise ValueError(f"key {key} is produced twice (topics {dict(topics)}); rename one")
                    episode[key] = value
            buffer.add_episode(episode)
    return buffer
