"""robomimic HDF5 <-> ReplayBuffer: round trip with filter keys, the file layout robomimic reads, malformed files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.replay_buffer import ReplayBuffer
from data.robomimic import read_robomimic, write_robomimic

h5py = pytest.importorskip("h5py")


def _buffer(lengths=(3, 5, 4)) -> ReplayBuffer:
    rng = np.random.default_rng(0)
    buf = ReplayBuffer()
    for i, n in enumerate(lengths):
        buf.add_episode(
            {
                "robot0_eef_pos": rng.normal(size=(n, 3)).astype(np.float32),
                "agentview_image": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
                "action": rng.normal(size=(n, 7)),
                "reward": np.arange(n, dtype=np.float32) == n - 1,
                "done": (np.arange(n) == n - 1).astype(np.int64),
                "state": np.full((n, 5), float(i)),
            }
        )
    return buf


def test_round_trip_with_filter_keys_and_robomimic_layout(tmp_path):
    buf = _buffer()
    env_args = {"env_name": "Lift", "type": 1, "env_kwargs": {"control_freq": 20}}
    path = write_robomimic(buf, tmp_path / "d.hdf5", env_args=env_args, masks={"train": [0, 2], "valid": [1]})
    assert path == tmp_path / "d.hdf5" and [p.name for p in tmp_path.iterdir()] == ["d.hdf5"]  # no temp file left

    back = read_robomimic(path)
    np.testing.assert_array_equal(back.episode_ends, buf.episode_ends)
    assert set(back.data) == set(buf.data)
    for key, arr in buf.data.items():
        np.testing.assert_array_equal(back.data[key], arr)
        assert back.data[key].dtype == arr.dtype

    train = read_robomimic(path, filter_key="train", obs_keys=["robot0_eef_pos"])
    assert set(train.data) == {"robot0_eef_pos", "action", "reward", "done", "state"}
    np.testing.assert_array_equal(train.episode_lengths, [3, 4])
    np.testing.assert_array_equal(train.data["state"][:, 0], [0, 0, 0, 2, 2, 2, 2])
    valid = read_robomimic(path, filter_key="valid")
    np.testing.assert_array_equal(valid.data["action"], buf.get_episode(1)["action"])

    with h5py.File(path, "r") as f:  # what robomimic's own loaders read
        assert json.loads(f["data"].attrs["env_args"]) == env_args
        assert f["data"].attrs["total"] == 12
        assert [f[f"data/demo_{i}"].attrs["num_samples"] for i in range(3)] == [3, 5, 4]
        assert sorted(f["data/demo_1"]) == ["actions", "dones", "next_obs", "obs", "rewards", "states"]
        assert list(f["mask/train"][:]) == [b"demo_0", b"demo_2"]
        nxt = f["data/demo_1/next_obs/robot0_eef_pos"][:]
        np.testing.assert_array_equal(nxt[:-1], buf.get_episode(1)["robot0_eef_pos"][1:])
        np.testing.assert_array_equal(nxt[-1], buf.get_episode(1)["robot0_eef_pos"][-1])


def test_demos_are_read_in_numeric_order(tmp_path):
    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        for i in (10, 2, 1):  # robomimic sorts demo_10 after demo_2
            f.create_dataset(f"data/demo_{i}/actions", data=np.full((2, 7), float(i)))
            f.create_dataset(f"data/demo_{i}/obs/x", data=np.zeros((2, 1)))
    np.testing.assert_array_equal(read_robomimic(path).data["action"][::2, 0], [1, 2, 10])


def test_malformed_files_are_rejected_with_a_reason(tmp_path):
    not_hdf5 = tmp_path / "notes.hdf5"
    not_hdf5.write_text("hello")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        read_robomimic(not_hdf5)
    with pytest.raises(FileNotFoundError, match="no robomimic dataset"):
        read_robomimic(tmp_path / "missing.hdf5")

    no_data = tmp_path / "no_data.hdf5"
    with h5py.File(no_data, "w") as f:
        f.create_dataset("actions", data=np.zeros((2, 7)))
    with pytest.raises(ValueError, match="expected a group data/"):
        read_robomimic(no_data)

    path = write_robomimic(_buffer(), tmp_path / "d.hdf5", masks={"train": [0]})
    with pytest.raises(ValueError, match=r"no filter key mask/valid; available filter keys: \['train'\]"):
        read_robomimic(path, filter_key="valid")
    with pytest.raises(ValueError, match="obs has no key 'object'"):
        read_robomimic(path, obs_keys=["object"])
    with h5py.File(path, "a") as f:
        del f["data/demo_1/actions"]
        f.create_dataset("data/demo_1/actions", data=np.zeros((4, 7)))  # obs still have 5 steps
    with pytest.raises(ValueError, match="data/demo_1: agentview_image has 5 steps but actions has 4"):
        read_robomimic(path)
    with h5py.File(path, "a") as f:
        del f["data/demo_1/actions"]
    with pytest.raises(ValueError, match="data/demo_1 has no actions"):
        read_robomimic(path)


def test_bad_write_input_leaves_existing_file(tmp_path):
    path = write_robomimic(_buffer(), tmp_path / "d.hdf5")
    with pytest.raises(ValueError, match=r"mask 'train' has episode indices \[3\] outside \[0, 3\)"):
        write_robomimic(_buffer(), path, masks={"train": [0, 3]})
    with pytest.raises(ValueError, match="needs an 'action' key"):
        write_robomimic(ReplayBuffer({"x": np.zeros((2, 1))}, [2]), path)
    assert read_robomimic(path).n_episodes == 3
    assert [p.name for p in tmp_path.iterdir()] == ["d.hdf5"]
