"""A stand-in ROS 2 robot driver over plain cyclonedds, for tests, benchmarks and trying the bridge without a robot.

    python -m deploy.ros2.peer --domain 0 --joints j1,j2 --rate 100 --duration 5

It publishes ``sensor_msgs/JointState`` at ``--rate`` (header.stamp = wall time of publishing, position[i] =
0.1 * (i + 1) + 0.001 * count) with the default ROS QoS, and subscribes to ``trajectory_msgs/JointTrajectory`` and
``std_msgs/Float64MultiArray`` (default QoS); with ``--image-topic`` it also publishes an rgb8 ``sensor_msgs/Image``
with the same header and every byte = count % 256. It reports on stdout as JSON lines: ``{"event": "ready"}``, one
``{"event": "trajectory" | "array", "recv_wall": ..., ...}`` per message received, and ``{"event": "done",
"published": n}``. deploy/ros2/rclpy_peer.py is the same program on a real rclpy node; ``PeerProcess`` starts
either one in a subprocess and collects its reports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cyclonedds.core import InstanceState, ReadCondition, SampleState, ViewState, WaitSet
from cyclonedds.pub import DataWriter
from cyclonedds.sub import DataReader
from cyclonedds.topic import Topic

from deploy.ros2 import dds, msgs

RCLPY_PYTHON_ENV = "ROBODIFF_RCLPY_PYTHON"
# Default interpreter of the ROS 2 wheels' virtual environment: ``rclpy-venv`` next to the repository checkout.
DEFAULT_RCLPY_PYTHON = Path(__file__).resolve().parents[3] / "rclpy-venv" / "bin" / "python"


def rclpy_python() -> str | None:
    """The interpreter that has the ``ros-rclpy`` wheels (``$ROBODIFF_RCLPY_PYTHON``, else ``DEFAULT_RCLPY_PYTHON``),
    or None when it does not exist."""
    path = Path(os.environ.get(RCLPY_PYTHON_ENV) or DEFAULT_RCLPY_PYTHON)
    return str(path) if path.is_file() else None


class PeerProcess:
    """A peer (``kind`` "cyclonedds" = this module, "rclpy" = rclpy_peer.py under ``rclpy_python()``) in a
    subprocess on loopback; a reader thread collects its JSON-line reports in ``events``."""

    def __init__(
        self, kind: str, domain: int, joints: list[str], rate: float = 100.0, duration: float = 10.0, **topics: str
    ) -> None:
        args = ["--domain", str(domain), "--joints", ",".join(joints), "--rate", str(rate), "--duration", str(duration)]
        args += [f"--{name.replace('_', '-')}={value}" for name, value in topics.items()]
        env = dict(os.environ)
        if kind == "cyclonedds":
            command = [sys.executable, "-m", "deploy.ros2.peer", *args]
        elif kind == "rclpy":
            python = rclpy_python()
            if python is None:
                raise FileNotFoundError(
                    f"no rclpy interpreter: set {RCLPY_PYTHON_ENV} (default {DEFAULT_RCLPY_PYTHON})"
                )
            command = [python, str(Path(__file__).with_name("rclpy_peer.py")), *args]
            # Jazzy and later: discovery and data on this host only (strace of the node, Jazzy and Kilted wheels:
            # every datagram it sent went to 127.0.0.1).
            env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
        else:
            raise ValueError(f"peer kind must be 'cyclonedds' or 'rclpy', got {kind!r}")
        self.events: list[dict] = []
        # stderr goes to a file: an unread pipe would block a chatty peer.
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the peer; closed in close())
        self._proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            self.events.append(json.loads(line))

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float) -> dict:
        """The first report satisfying ``predicate``; raises TimeoutError (with the peer's stderr if it died)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = next((e for e in list(self.events) if predicate(e)), None)
            if found is not None:
                return found
            if self._proc.poll() is not None and not self._reader.is_alive():
                self._stderr.seek(0)
                raise RuntimeError(f"peer exited with {self._proc.returncode}: {self._stderr.read()[-2000:]}")
            time.sleep(0.005)
        raise TimeoutError(f"no matching peer report within {timeout} s; got {[e['event'] for e in self.events]}")

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._reader.join(timeout=1)
        self._proc.stdout.close()
        self._stderr.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domain", type=int, default=None, help="DDS domain id (default: ROS_DOMAIN_ID or 0)")
    p.add_argument("--joints", required=True, help="comma-separated joint names")
    p.add_argument("--rate", type=float, default=100.0, help="JointState rate in Hz (0: publish none)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds to run")
    p.add_argument("--state-topic", default="/joint_states")
    p.add_argument("--trajectory-topic", default="/joint_trajectory_controller/joint_trajectory")
    p.add_argument("--array-topic", default="/forward_position_controller/commands")
    p.add_argument("--image-topic", default=None, help="also publish sensor_msgs/Image here (with --image-shape)")
    p.add_argument("--image-shape", default="48,64,3", help="height,width,channels of the published rgb8 image")
    p.add_argument("--any-interface", action="store_true", help="do not restrict DDS to loopback")
    return p.parse_args(argv)


def emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def trajectory_event(msg: msgs.JointTrajectory, recv_wall: float) -> dict:
    return {
        "event": "trajectory",
        "recv_wall": recv_wall,
        "stamp": msgs.to_seconds(msg.header.stamp),
        "joint_names": list(msg.joint_names),
        "points": [list(p.positions) for p in msg.points],
        "time_from_start": [msgs.to_seconds(p.time_from_start) for p in msg.points],
    }


def array_event(msg: msgs.Float64MultiArray, recv_wall: float) -> dict:
    dims = [[d.label, d.size, d.stride] for d in msg.layout.dim]
    return {"event": "array", "recv_wall": recv_wall, "dims": dims, "data": list(msg.data)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    joints = args.joints.split(",")
    _domain, participant = dds.open_participant(dds.resolve_domain_id(args.domain), not args.any_interface)

    def topic(name: str, idl_type: type) -> Topic:
        return Topic(participant, dds.dds_topic(name), idl_type)

    state_writer = DataWriter(participant, topic(args.state_topic, msgs.JointState), qos=dds.qos("default"))
    trajectory_reader = DataReader(
        participant, topic(args.trajectory_topic, msgs.JointTrajectory), qos=dds.qos("default")
    )
    array_reader = DataReader(participant, topic(args.array_topic, msgs.Float64MultiArray), qos=dds.qos("default"))
    readers = [(trajectory_reader, trajectory_event), (array_reader, array_event)]
    image_writer = None
    if args.image_topic:
        height, width, channels = (int(v) for v in args.image_shape.split(","))
        image = msgs.image_type(height, width, channels)
        image_writer = DataWriter(participant, topic(args.image_topic, image), qos=dds.qos("default"))
    # Block on a WaitSet until a command arrives or the next JointState is due: exact receive times, no busy poll.
    waitset = WaitSet(participant)
    for reader, _ in readers:
        waitset.attach(ReadCondition(reader, SampleState.NotRead | ViewState.Any | InstanceState.Any))
    emit({"event": "ready"})
    period = 1.0 / args.rate if args.rate > 0 else float("inf")
    end = time.monotonic() + args.duration
    next_publish, count = time.monotonic(), 0
    while (now := time.monotonic()) < end:
        if now >= next_publish:
            positions = [0.1 * (i + 1) + 0.001 * count for i in range(len(joints))]
            header = msgs.Header(stamp=msgs.time_msg(time.time()))
            state_writer.write(msgs.JointState(header=header, name=joints, position=positions))
            if image_writer is not None:  # every pixel = count % 256
                image_writer.write(image(header=header, data=bytes([count % 256]) * (height * width * channels)))
            count += 1
            next_publish += period
        waitset.wait(round(1e9 * max(0.0, min(next_publish, end) - time.monotonic())))
        for reader, to_event in readers:
            for msg in reader.take(N=64):
                emit(to_event(msg, time.time()))
    emit({"event": "done", "published": count})


if __name__ == "__main__":
    main()
