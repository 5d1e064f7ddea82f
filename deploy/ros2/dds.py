"""How ROS 2 sits on DDS: topic names, QoS profiles, domain id and the Cyclone DDS configuration.

- A ROS topic ``/joint_states`` is the DDS topic ``rt/joint_states`` (rmw prefix ``rt`` + the fully qualified name).
- QoS (rmw_qos_profile_default / rmw_qos_profile_sensor_data): "default" = reliable, volatile, keep-last 10;
  "sensor" = best-effort, volatile, keep-last 5. A control loop reader keeps only the newest sample (keep-last 1).
  A best-effort reader matches reliable and best-effort writers; a reliable reader matches only reliable writers.
- Domain id: the configured one, else ``ROS_DOMAIN_ID``, else 0 (as rmw does).
- Cyclone configuration: always ``IgnoreTypeInformation 1.15`` (Fast DDS 3.x, ROS 2 Kilted's default middleware,
  otherwise silently refuses every type containing a sequence); optionally loopback only (127.0.0.1, no multicast,
  unicast discovery of participant indices 0..32). A user ``CYCLONEDDS_URI`` (a file or XML) replaces the loopback
  settings (network settings are lists in Cyclone: naming the same interface twice is an error); the compatibility
  setting is always added before it.
- Since Iron, ROS endpoints carry USER_DATA ``typehash=RIHS01_<hex>;`` (REP 2011). It feeds ``ros2 topic info -v``
  and does not decide matching; we send it when rosbags (which computes the hashes) is installed.
"""

from __future__ import annotations

import functools
import os

from cyclonedds.core import Qos
from cyclonedds.domain import Domain, DomainParticipant
from cyclonedds.qos import Policy
from cyclonedds.util import duration

QOS_PROFILES = ("default", "sensor")

# 1.15 is Fast DDS's vendor id: ignore the type information it sends (see the module docstring).
_COMPATIBILITY = "<Compatibility><IgnoreTypeInformation>1.15</IgnoreTypeInformation></Compatibility>"
_LOOPBACK = (
    '<General><Interfaces><NetworkInterface address="127.0.0.1"/></Interfaces>'
    "<AllowMulticast>false</AllowMulticast></General>"
    "<Discovery><ParticipantIndex>auto</ParticipantIndex><MaxAutoParticipantIndex>32</MaxAutoParticipantIndex>"
    '<Peers><Peer address="127.0.0.1"/></Peers></Discovery>'
)


def cyclone_config(loopback_only: bool) -> str:
    """The Cyclone DDS XML this bridge runs with (also what a peer process gets as ``CYCLONEDDS_URI``)."""
    body = _COMPATIBILITY + (_LOOPBACK if loopback_only else "")
    return f'<CycloneDDS><Domain id="any">{body}</Domain></CycloneDDS>'


def resolve_domain_id(domain_id: int | None) -> int:
    """``domain_id``, else ``ROS_DOMAIN_ID``, else 0; DDS port mapping allows 0..232."""
    if domain_id is None:
        raw = os.environ.get("ROS_DOMAIN_ID", "").strip()
        domain_id = int(raw) if raw else 0
    if not 0 <= domain_id <= 232:
        raise ValueError(f"domain_id must be in 0..232, got {domain_id}")
    return domain_id


def dds_topic(ros_name: str) -> str:
    """``/joint_states`` -> ``rt/joint_states`` (relative names are taken from the root namespace)."""
    name = ros_name if ros_name.startswith("/") else "/" + ros_name
    if not name[1:] or name.endswith("/") or "//" in name:
        raise ValueError(f"invalid ROS topic name {ros_name!r}")
    return "rt" + name


def qos(profile: str, depth: int | None = None, user_data: bytes = b"") -> Qos:
    """A ROS QoS profile (``QOS_PROFILES``) as Cyclone QoS; ``depth`` overrides the keep-last depth."""
    if profile == "default":
        reliability, keep = Policy.Reliability.Reliable(max_blocking_time=duration(milliseconds=100)), 10
    elif profile == "sensor":
        reliability, keep = Policy.Reliability.BestEffort, 5
    else:
        raise ValueError(f"QoS profile must be one of {QOS_PROFILES}, got {profile!r}")
    policies = [reliability, Policy.Durability.Volatile, Policy.History.KeepLast(depth or keep)]
    if user_data:
        policies.append(Policy.Userdata(data=user_data))
    return Qos(*policies)


@functools.cache
def type_hash_user_data(ros_type: str) -> bytes:
    """USER_DATA ``typehash=RIHS01_<hex>;`` for e.g. ``sensor_msgs/msg/JointState`` (empty without rosbags)."""
    try:
        from rosbags.typesys import Stores, get_typestore
    except ImportError:
        return b""
    return f"typehash={get_typestore(Stores.ROS2_KILTED).hash_rihs01(ros_type)};".encode()


def open_participant(domain_id: int, loopback_only: bool) -> tuple[Domain, DomainParticipant]:
    """A participant on ``domain_id`` configured by ``cyclone_config(loopback_only)``, or by the compatibility
    setting followed by the user's ``CYCLONEDDS_URI`` when that is set (Cyclone merges a comma-separated list).

    Keep the returned Domain alive as long as the participant; a process can open one Domain per id."""
    user = os.environ.get("CYCLONEDDS_URI", "").strip()
    config = f"{cyclone_config(False)},{user}" if user else cyclone_config(loopback_only)
    domain = Domain(domain_id, config=config)
    return domain, DomainParticipant(domain_id)
