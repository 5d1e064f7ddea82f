"""Subprocess smoke tests of ``robodiff data info / convert / generate`` on tiny datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_cli import last_json, robodiff  # the subprocess helpers of the other CLI smoke tests

from cli.main import main
from data.replay_buffer import ReplayBuffer


@pytest.fixture
def tiny_zarr(tmp_path):
    """Two episodes (5 and 7 steps): state, action and a moving 32x32 camera image."""
    n = 12
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:32, 0:32]
    frames = [np.stack([np.clip(255 - 20 * np.hypot(x - 4 - 2 * t, y - 16), 0, 255)] * 3, -1) for t in range(n)]
    buffer = ReplayBuffer(
        {
            "state": rng.normal(size=(n, 4)).astype(np.float32),
            "action": rng.normal(size=(n, 2)).astype(np.float32),
            "image": np.stack(frames).astype(np.uint8),
        },
        [5, n],
    )
    return buffer, buffer.save(tmp_path / "tiny.zarr")


def test_data_info_convert_round_trip(tiny_zarr, tmp_path):
    buffer, store = tiny_zarr
    proc = robodiff("data", "info", str(store))
    info = last_json(proc)
    assert info["format"] == "zarr" and info["n_episodes"] == 2 and info["n_steps"] == 12
    assert info["keys"]["image"]["shape"] == [32, 32, 3] and info["keys"]["image"]["dtype"] == "uint8"
    assert info["keys"]["state"]["mean"] == pytest.approx(float(buffer.data["state"].astype(np.float64).mean()))
    table = proc.stdout.splitlines()  # the readable table, then the JSON line
    assert "2 episodes, 12 steps" in table[0]
    assert [line.split()[0] for line in table[1:5]] == ["key", "action", "image", "state"]

    lerobot = tmp_path / "tiny_lerobot"
    out = last_json(
        robodiff("data", "convert", f"from={store}", f"to={lerobot}", "to_format=lerobot", "fps=15", "task=reach")
    )
    assert out["to_format"] == "lerobot" and out["n_steps"] == 12
    meta = json.loads((lerobot / "meta" / "info.json").read_text())
    assert meta["fps"] == 15 and meta["features"]["observation.images.image"]["shape"] == [32, 32, 3]
    info = last_json(robodiff("data", "info", f"path={lerobot}"))
    assert info["format"] == "lerobot" and info["tasks"] == ["reach"] and info["episode_length"]["max"] == 7

    back_path = tmp_path / "back.zarr"
    robodiff("data", "convert", f"from={lerobot}", f"to={back_path}")
    back = ReplayBuffer.load(back_path)
    np.testing.assert_array_equal(back.episode_ends, [5, 12])
    np.testing.assert_array_equal(back.data["state"], buffer.data["state"])
    np.testing.assert_array_equal(back.data["action"], buffer.data["action"])
    assert np.abs(back.data["image"].astype(int) - buffer.data["image"]).mean() < 3.0


def test_data_usage_errors(tiny_zarr, tmp_path, capsys):
    _, store = tiny_zarr
    cases = [
        (["data"], "data needs a subcommand, one of ['info', 'convert', 'generate']"),
        (["data", "info", str(tmp_path / "none.zarr")], "no dataset at"),
        (["data", "convert", f"from={store}", f"to={tmp_path / 'x'}"], "cannot tell the format of"),
        (["data", "convert", f"from={store}", f"to={tmp_path / 'x'}", "to_format=lerobot"], "needs fps="),
        (
            ["data", "convert", f"from={store}", f"to={tmp_path / 'x'}", "to_format=lerobot", "fps=10", "fsp=3"],
            "unknown option fsp; the reader takes ['keys'], the writer takes ['fps',",
        ),
        (["data", "generate", "task=pusht_state", "n_episodes=1", f"out={tmp_path / 'g'}"], "tasks that can: ["),
        (["data", "generate", "task=metaworld/reach-v3", "n_episodes=0", f"out={tmp_path / 'g'}"], "n_episodes must"),
    ]
    for args, message in cases:  # in-process through the CLI entry point: a subprocess each would cost seconds
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
    assert not (tmp_path / "x").exists()


def test_data_convert_rosbag_passes_topics_and_rate(tmp_path):
    """A ROS 2 mcap bag with a joint-state ramp -> zarr; the bag options (topics, rate_hz) go to import_rosbag."""
    pytest.importorskip("rosbags", reason="ROS bag import needs rosbags (the ros2 extra)")
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    bag = tmp_path / "bag"
    t0 = 1_700_000_000 * 10**9
    with Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        conn = writer.add_connection("/joint_states", "sensor_msgs/msg/JointState", typestore=store)
        for k in range(21):  # 50 Hz for 0.4 s: position [t, -2t]
            stamp = t0 + k * 20 * 10**6
            time = store.types["builtin_interfaces/msg/Time"](sec=stamp // 10**9, nanosec=stamp % 10**9)
            msg = store.types["sensor_msgs/msg/JointState"](
                header=store.types["std_msgs/msg/Header"](stamp=time, frame_id=""),
                name=["a", "b"],
                position=np.array([k * 0.02, -k * 0.04]),
                velocity=np.zeros(0),
                effort=np.zeros(0),
            )
            writer.write(conn, stamp, store.serialize_cdr(msg, "sensor_msgs/msg/JointState"))
    out = tmp_path / "bag.zarr"
    result = last_json(
        robodiff(
            "data", "convert", f"from={bag / 'bag.mcap'}", f"to={out}", "topics={/joint_states:state}", "rate_hz=10"
        )
    )
    assert result["from_format"] == "rosbag" and result["n_episodes"] == 1
    state = ReplayBuffer.load(out).data["state"]
    np.testing.assert_allclose(state[:, 0], np.arange(len(state)) * 0.1, atol=1e-6)  # 10 Hz grid on the ramp
    np.testing.assert_allclose(state[:, 1], -2 * state[:, 0], atol=1e-6)


@pytest.mark.slow
def test_data_generate_metaworld_then_convert(tmp_path):
    pytest.importorskip("metaworld", reason="the sims extra (metaworld) is not installed")
    out = tmp_path / "reach.zarr"
    result = last_json(robodiff("data", "generate", "task=metaworld/reach-v3", "n_episodes=1", f"out={out}", "seed=3"))
    assert result["task"] == "metaworld/reach-v3" and result["out"] == str(out)
    generated = ReplayBuffer.load(out)
    assert generated.n_episodes == 1 and "action" in generated.data
    lerobot = tmp_path / "reach_lerobot"
    robodiff("data", "convert", f"from={out}", f"to={lerobot}", "to_format=lerobot", "fps=80", "task=reach")
    meta = json.loads((lerobot / "meta" / "info.json").read_text())
    assert meta["total_frames"] == generated.n_steps and meta["features"]["action"]["shape"] == [4]
