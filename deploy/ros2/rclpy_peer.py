"""deploy/ros2/peer.py on a real ROS 2 node (rclpy), the interoperability oracle for tests and benchmarks.

Not imported by ``deploy``: it runs under the separate virtual environment holding the community ROS 2 wheels
(README "ROS 2 bridge"; by default ../rclpy-venv next to the checkout, see tests/test_ros2_interop.py), e.g.

    ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ../rclpy-venv/bin/python deploy/ros2/rclpy_peer.py --joints j1

deploy.ros2.peer.PeerProcess("rclpy", ...) starts it that way.
Same arguments, topics, published content and JSON-line reports as deploy/ros2/peer.py. It uses the rmw the wheels
ship (Fast DDS), so a passing run shows that our Cyclone participant and a stock ROS 2 stack interoperate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import rclpy
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float64MultiArray
from trajectory_msgs.msg import JointTrajectory


def to_seconds(t) -> float:
    return t.sec + t.nanosec * 1e-9


def emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domain", type=int, default=None)
    p.add_argument("--joints", required=True)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--state-topic", default="/joint_states")
    p.add_argument("--trajectory-topic", default="/joint_trajectory_controller/joint_trajectory")
    p.add_argument("--array-topic", default="/forward_position_controller/commands")
    p.add_argument("--image-topic", default=None)
    p.add_argument("--image-shape", default="48,64,3")
    args = p.parse_args()
    height, width, channels = (int(v) for v in args.image_shape.split(","))
    joints = args.joints.split(",")

    rclpy.init(domain_id=args.domain)
    node = rclpy.create_node("robodiff_rclpy_peer")

    def on_trajectory(msg: JointTrajectory) -> None:
        emit(
            {
                "event": "trajectory",
                "recv_wall": time.time(),
                "stamp": to_seconds(msg.header.stamp),
                "joint_names": list(msg.joint_names),
                "points": [list(pt.positions) for pt in msg.points],
                "time_from_start": [to_seconds(pt.time_from_start) for pt in msg.points],
            }
        )

    def on_array(msg: Float64MultiArray) -> None:
        dims = [[d.label, d.size, d.stride] for d in msg.layout.dim]
        emit({"event": "array", "recv_wall": time.time(), "dims": dims, "data": list(msg.data)})

    # Default ROS QoS (reliable, volatile, keep-last 10) everywhere, like a ros2_control driver and controllers.
    node.create_subscription(JointTrajectory, args.trajectory_topic, on_trajectory, 10)
    node.create_subscription(Float64MultiArray, args.array_topic, on_array, 10)
    publisher = node.create_publisher(JointState, args.state_topic, 10)
    image_publisher = node.create_publisher(Image, args.image_topic, 10) if args.image_topic else None
    count = 0

    def publish_state() -> None:
        nonlocal count
        msg = JointState()
        now = time.time()
        msg.header.stamp.sec, msg.header.stamp.nanosec = int(now), int((now - int(now)) * 1e9)
        msg.name = joints
        msg.position = [0.1 * (i + 1) + 0.001 * count for i in range(len(joints))]
        publisher.publish(msg)
        if image_publisher is not None:  # every pixel = count % 256
            image = Image(header=msg.header, height=height, width=width, encoding="rgb8", step=width * channels)
            image.data = bytes([count % 256]) * (height * width * channels)
            image_publisher.publish(image)
        count += 1

    if args.rate > 0:
        node.create_timer(1.0 / args.rate, publish_state)
    emit({"event": "ready"})
    end = time.monotonic() + args.duration
    while time.monotonic() < end:
        rclpy.spin_once(node, timeout_sec=0.01)
    emit({"event": "done", "published": count})
    node.destroy_node()
    rclpy.shutdown()


if __name__ == "__main__":
    main()
