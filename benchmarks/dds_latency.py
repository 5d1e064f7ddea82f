"""One-way DDS latency between two processes on loopback, as the ROS 2 bridge uses DDS.

    python benchmarks/dds_latency.py [--seconds 5] [--out runs/bench/dds_latency.json]

- JointState at 100 Hz, peer -> us: the peer stamps header.stamp with its wall clock when it publishes; we block on a
  WaitSet and take the sample at once (the bridge's reader QoS: best-effort keep-last 1).
- A 16x7 Float64MultiArray chunk (16 actions x 7 joints) at 100 Hz, us -> peer: element [0, 0] carries our wall
  clock at publishing; the peer records its receive time (default QoS: reliable keep-last 10).
Both processes share the machine's wall clock, so receive - send is the one-way latency. The peer is deploy/ros2/peer.py
(plain cyclonedds) and, if its environment exists (``$ROBODIFF_RCLPY_PYTHON``), deploy/ros2/rclpy_peer.py (a real rclpy
node on Fast DDS). Measurement starts once samples flow both ways (discovery finished on both sides). Prints and
writes p50/p99/max in milliseconds as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from cyclonedds.core import InstanceState, ReadCondition, SampleState, ViewState, WaitSet
from cyclonedds.pub import DataWriter
from cyclonedds.sub import DataReader
from cyclonedds.topic import Topic

from deploy.ros2 import dds, msgs
from deploy.ros2.peer import PeerProcess, rclpy_python

JOINTS = [f"joint_{i}" for i in range(1, 8)]
STATE_TOPIC, ARRAY_TOPIC = "/joint_states", "/forward_position_controller/commands"
RATE_HZ, DISCOVERY_TIMEOUT_S = 100.0, 30.0


def summary(latencies_s: list[float]) -> dict:
    ms = 1e3 * np.asarray(latencies_s)
    p50, p99 = np.percentile(ms, [50, 99])
    return {"n": len(ms), "p50_ms": float(p50), "p99_ms": float(p99), "max_ms": float(ms.max())}


def measure(kind: str, domain: int, participant, seconds: float) -> dict:
    """Run one peer of ``kind`` for ``seconds`` of measurement on ``domain`` (our ``participant``)."""
    state_reader = DataReader(
        participant, Topic(participant, dds.dds_topic(STATE_TOPIC), msgs.JointState), qos=dds.qos("sensor", depth=1)
    )
    array_writer = DataWriter(
        participant, Topic(participant, dds.dds_topic(ARRAY_TOPIC), msgs.Float64MultiArray), qos=dds.qos("default")
    )
    waitset = WaitSet(participant)
    waitset.attach(ReadCondition(state_reader, SampleState.NotRead | ViewState.Any | InstanceState.Any))
    topics = {"state_topic": STATE_TOPIC, "array_topic": ARRAY_TOPIC}
    peer = PeerProcess(kind, domain, JOINTS, rate=RATE_HZ, duration=seconds + 60, **topics)
    try:
        chunk = np.random.default_rng(0).uniform(-1, 1, size=(16, 7))
        state_latency, sent_wall = [], []
        measure_from = None  # wall time at which both directions flow (discovery done on both sides)
        next_send = time.monotonic()
        end = next_send + DISCOVERY_TIMEOUT_S
        while (now := time.monotonic()) < end:
            if measure_from is None and state_latency and any(e["event"] == "array" for e in list(peer.events)):
                measure_from, end = time.time(), now + seconds
                state_latency.clear()
            if now >= next_send:
                chunk[0, 0] = time.time()
                array_writer.write(msgs.float64_array(chunk, ("time", "joints")))
                sent_wall.append(chunk[0, 0])
                next_send += 1.0 / RATE_HZ
            waitset.wait(round(1e9 * max(0.0, min(next_send, end) - time.monotonic())))
            state_latency += [time.time() - msgs.to_seconds(m.header.stamp) for m in state_reader.take(N=16)]
        if measure_from is None:
            raise RuntimeError(f"no two-way traffic with the {kind} peer within {DISCOVERY_TIMEOUT_S} s")
        time.sleep(0.2)  # the last chunks in flight
        events = [e for e in peer.events if e["event"] == "array" and e["data"][0] >= measure_from]
        sent = sum(1 for t in sent_wall if t >= measure_from)
        chunk_summary = summary([e["recv_wall"] - e["data"][0] for e in events]) | {
            "sent": sent,
            "lost": sent - len(events),
        }
        return {"joint_state_100hz": summary(state_latency), "float64_chunk_16x7_100hz": chunk_summary}
    finally:
        peer.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0, help="measurement seconds per peer")
    p.add_argument("--domain", type=int, default=150 + os.getpid() % 50)
    p.add_argument("--out", default="runs/bench/dds_latency.json")
    args = p.parse_args()
    _domain, participant = dds.open_participant(args.domain, loopback_only=True)
    results = {
        "command": "python benchmarks/dds_latency.py " + f"--seconds {args.seconds}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "cyclonedds_peer": measure("cyclonedds", args.domain, participant, args.seconds),
    }
    if rclpy_python() is not None:
        results["rclpy_peer"] = measure("rclpy", args.domain, participant, args.seconds)
    else:
        results["rclpy_peer"] = "skipped: no rclpy environment (set ROBODIFF_RCLPY_PYTHON)"
    print(json.dumps(results, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    main()
