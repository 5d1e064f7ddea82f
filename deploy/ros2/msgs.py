"""ROS 2 message types as DDS IDL structs, byte-compatible with what rmw implementations put on the wire.

ROS 2 maps ``pkg/msg/Type`` to the DDS type ``pkg::msg::dds_::Type_`` and serializes it as plain (XCDR1) CDR with
final extensibility (cyclonedds-python's default; ``@appendable`` would force XCDR2 and fail to match ROS peers).
Integers use explicit fixed-width types because a plain Python ``int`` serializes as 64 bits. The CDR bytes of every
type here are checked against ``rosbags``' serializer in tests/test_ros2_bridge.py.

No ``from __future__ import annotations`` here: cyclonedds resolves the field annotations as real objects.
"""

import dataclasses
import math

import numpy as np
from cyclonedds.idl import IdlStruct
from cyclonedds.idl.types import array, float64, int32, sequence, uint8, uint32


@dataclasses.dataclass
class Time(IdlStruct, typename="builtin_interfaces::msg::dds_::Time_"):
    sec: int32 = 0
    nanosec: uint32 = 0


@dataclasses.dataclass
class Duration(IdlStruct, typename="builtin_interfaces::msg::dds_::Duration_"):
    sec: int32 = 0
    nanosec: uint32 = 0


@dataclasses.dataclass
class Header(IdlStruct, typename="std_msgs::msg::dds_::Header_"):
    stamp: Time = dataclasses.field(default_factory=Time)
    frame_id: str = ""


@dataclasses.dataclass
class JointState(IdlStruct, typename="sensor_msgs::msg::dds_::JointState_"):
    header: Header = dataclasses.field(default_factory=Header)
    name: sequence[str] = dataclasses.field(default_factory=list)
    position: sequence[float64] = dataclasses.field(default_factory=list)
    velocity: sequence[float64] = dataclasses.field(default_factory=list)
    effort: sequence[float64] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class JointTrajectoryPoint(IdlStruct, typename="trajectory_msgs::msg::dds_::JointTrajectoryPoint_"):
    positions: sequence[float64] = dataclasses.field(default_factory=list)
    velocities: sequence[float64] = dataclasses.field(default_factory=list)
    accelerations: sequence[float64] = dataclasses.field(default_factory=list)
    effort: sequence[float64] = dataclasses.field(default_factory=list)
    time_from_start: Duration = dataclasses.field(default_factory=Duration)


@dataclasses.dataclass
class JointTrajectory(IdlStruct, typename="trajectory_msgs::msg::dds_::JointTrajectory_"):
    header: Header = dataclasses.field(default_factory=Header)
    joint_names: sequence[str] = dataclasses.field(default_factory=list)
    points: sequence[JointTrajectoryPoint] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class MultiArrayDimension(IdlStruct, typename="std_msgs::msg::dds_::MultiArrayDimension_"):
    label: str = ""
    size: uint32 = 0
    stride: uint32 = 0


@dataclasses.dataclass
class MultiArrayLayout(IdlStruct, typename="std_msgs::msg::dds_::MultiArrayLayout_"):
    dim: sequence[MultiArrayDimension] = dataclasses.field(default_factory=list)
    data_offset: uint32 = 0


@dataclasses.dataclass
class Float64MultiArray(IdlStruct, typename="std_msgs::msg::dds_::Float64MultiArray_"):
    layout: MultiArrayLayout = dataclasses.field(default_factory=MultiArrayLayout)
    data: sequence[float64] = dataclasses.field(default_factory=list)


def image_type(height: int, width: int, channels: int) -> type[IdlStruct]:
    """A ``sensor_msgs/Image`` struct for one fixed frame size.

    ``data`` is ``sequence<uint8>`` in ROS; declared as ``bytes`` it breaks topic creation in cyclonedds 11.0.1 and as
    ``sequence[uint8]`` it takes ~48 ms per 640x480x3 frame. A ``uint32`` length followed by a fixed
    ``array[uint8, N]`` puts the same bytes on the wire and takes ~0.4 ms (../shared/notes/ros2-over-dds.md); peers
    must therefore send exactly ``height * width * channels`` bytes.
    """
    for name, value in (("height", height), ("width", width), ("channels", channels)):
        if value < 1:
            raise ValueError(f"image {name} must be >= 1, got {value}")
    # Class-body names shadow the arguments, so take them under other names first.
    rows, cols, n = height, width, height * width * channels

    @dataclasses.dataclass
    class Image(IdlStruct, typename="sensor_msgs::msg::dds_::Image_"):
        header: Header = dataclasses.field(default_factory=Header)
        height: uint32 = rows
        width: uint32 = cols
        encoding: str = "rgb8"
        is_bigendian: uint8 = 0
        step: uint32 = cols * channels
        data_length: uint32 = n
        data: array[uint8, n] = dataclasses.field(default_factory=lambda: bytes(n))

    return Image


def ros_type_name(idl_type: type[IdlStruct]) -> str:
    """``sensor_msgs::msg::dds_::JointState_`` -> ``sensor_msgs/msg/JointState`` (the ROS interface name)."""
    pkg, kind, _, name = idl_type.__idl_typename__.split("::")
    return f"{pkg}/{kind}/{name.removesuffix('_')}"


def time_msg(seconds: float) -> Time:
    """Wall-clock seconds since the epoch -> ``builtin_interfaces/Time`` (nanosec in [0, 1e9))."""
    sec = math.floor(seconds)
    return Time(sec=sec, nanosec=min(round((seconds - sec) * 1e9), 999_999_999))


def duration_msg(seconds: float) -> Duration:
    """Seconds -> ``builtin_interfaces/Duration`` (negative durations keep nanosec in [0, 1e9) as ROS does)."""
    t = time_msg(seconds)
    return Duration(sec=t.sec, nanosec=t.nanosec)


def to_seconds(t: Time | Duration) -> float:
    return t.sec + t.nanosec * 1e-9


def float64_array(values: np.ndarray, labels: tuple[str, ...]) -> Float64MultiArray:
    """``values [d0, d1, ...]`` -> a row-major Float64MultiArray with one labelled dimension per axis."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != len(labels):
        raise ValueError(f"float64_array needs one label per axis of shape {values.shape}, got labels {labels}")
    strides = np.cumprod(values.shape[::-1])[::-1]
    dims = [
        MultiArrayDimension(label=lb, size=n, stride=int(s))
        for lb, n, s in zip(labels, values.shape, strides, strict=True)
    ]
    return Float64MultiArray(layout=MultiArrayLayout(dim=dims, data_offset=0), data=values.ravel().tolist())
