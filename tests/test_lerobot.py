"""LeRobotDataset v3 export/import on real Push-T episodes (state + 96x96 camera), format detection and summaries."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from data import formats
from data.formats import buffer_summary, dataset_info, detect_format, read_dataset, write_dataset
from data.lerobot import load_info, read_lerobot, write_lerobot
from data.replay_buffer import ReplayBuffer

N_EPISODES = 3


@pytest.fixture(scope="module")
def pusht_buffer(pusht_path) -> ReplayBuffer:
    """The first episodes of the Push-T demonstrations: recorded state, action, keypoints and uint8 camera frames."""
    root = zarr.open_group(str(pusht_path), mode="r")
    ends = root["meta"]["episode_ends"][:N_EPISODES]
    n = int(ends[-1])
    data = {k: root["data"][k][:n] for k in ("state", "action", "keypoint", "n_contacts")}
    data["img"] = np.clip(np.rint(root["data"]["img"][:n]), 0, 255).astype(np.uint8)
    return ReplayBuffer(data, ends)


@pytest.fixture(scope="module")
def exported(pusht_buffer, tmp_path_factory):
    path = tmp_path_factory.mktemp("lerobot") / "pusht"
    write_lerobot(pusht_buffer, path, fps=10, task="Push the T-shaped block onto the target.")
    return path


def test_export_layout_matches_lerobot_v3(pusht_buffer, exported):
    info = json.loads((exported / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10
    assert info["total_episodes"] == N_EPISODES and info["total_frames"] == pusht_buffer.n_steps
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    ft = info["features"]
    assert ft["observation.state"] == {"dtype": "float32", "shape": [5], "names": None}
    assert ft["observation.keypoint"]["shape"] == [9, 2] and ft["action"]["shape"] == [2]
    assert ft["observation.images.img"]["dtype"] == "video" and ft["observation.images.img"]["shape"] == [96, 96, 3]
    assert ft["observation.images.img"]["info"]["video.codec"] == "av1"
    assert {"timestamp", "frame_index", "episode_index", "index", "task_index"} <= set(ft)

    # Frames: one Parquet file, scalar bookkeeping columns, state as a fixed-size list.
    frames = pq.read_table(exported / "data" / "chunk-000" / "file-000.parquet")
    assert frames.num_rows == pusht_buffer.n_steps
    ep1 = frames.filter(frames["episode_index"].to_numpy() == 1)
    assert ep1["frame_index"].to_pylist()[:3] == [0, 1, 2]
    np.testing.assert_allclose(ep1["timestamp"].to_numpy()[:3], [0.0, 0.1, 0.2], atol=1e-6)
    assert ep1["index"].to_pylist()[0] == pusht_buffer.episode_ends[0]

    # Episodes: rows into the frames and consecutive windows of the one MP4.
    episodes = pq.read_table(exported / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    lengths = pusht_buffer.episode_lengths
    assert [e["length"] for e in episodes] == lengths.tolist()
    assert [e["dataset_to_index"] for e in episodes] == pusht_buffer.episode_ends.tolist()
    key = "videos/observation.images.img"
    assert episodes[0][f"{key}/from_timestamp"] == 0.0
    for prev, e in zip(episodes, episodes[1:], strict=False):
        assert e[f"{key}/from_timestamp"] == pytest.approx(prev[f"{key}/to_timestamp"])
    assert episodes[-1][f"{key}/to_timestamp"] == pytest.approx(pusht_buffer.n_steps / 10)
    assert episodes[0]["tasks"] == ["Push the T-shaped block onto the target."]
    assert episodes[0]["stats/observation.state/count"] == [lengths[0]]

    # Stats: LeRobot's layout (per dimension; images per channel as (3, 1, 1) in [0, 1]).
    stats = json.loads((exported / "meta" / "stats.json").read_text())
    state = pusht_buffer.data["state"].astype(np.float64)
    np.testing.assert_allclose(stats["observation.state"]["mean"], state.mean(0), rtol=1e-9)
    np.testing.assert_allclose(stats["observation.state"]["std"], state.std(0), rtol=1e-9)
    assert stats["observation.state"]["count"] == [pusht_buffer.n_steps]
    img = pusht_buffer.data["img"].astype(np.float64) / 255
    assert np.asarray(stats["observation.images.img"]["mean"]).shape == (3, 1, 1)
    np.testing.assert_allclose(np.ravel(stats["observation.images.img"]["mean"]), img.mean((0, 1, 2)), rtol=1e-9)
    np.testing.assert_allclose(np.ravel(stats["observation.images.img"]["min"]), img.min((0, 1, 2)))

    # Tasks: the pandas index "task" that LeRobot's pd.read_parquet restores.
    tasks = pq.read_table(exported / "meta" / "tasks.parquet")
    assert tasks.to_pylist() == [{"task_index": 0, "task": "Push the T-shaped block onto the target."}]
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]


def test_round_trip_exact_numbers_lossy_video(pusht_buffer, exported):
    back = read_lerobot(exported)
    np.testing.assert_array_equal(back.episode_ends, pusht_buffer.episode_ends)
    assert set(back.data) == {"state", "action", "keypoint", "n_contacts", "img"}
    for key in ("state", "action", "keypoint", "n_contacts"):
        assert back.data[key].dtype == pusht_buffer.data[key].dtype
        np.testing.assert_array_equal(back.data[key], pusht_buffer.data[key])
    assert back.data["img"].shape == pusht_buffer.data["img"].shape and back.data["img"].dtype == np.uint8
    err = np.abs(back.data["img"].astype(np.int16) - pusht_buffer.data["img"])
    # AV1 at CRF 30 with 4:2:0 chroma: about 1 grey level on average on these frames (measured 0.96).
    assert err.mean() < 2.0 and np.percentile(err, 99) < 30
    # Frames land on their own steps: on the pixels that change between two steps (the moving agent), a decoded
    # frame is nearer its own source frame than the neighbouring one (measured 94% / 100%; one step off gives 0%).
    dec, src = back.data["img"].astype(np.float32), pusht_buffer.data["img"].astype(np.float32)
    changed = np.abs(src[1:] - src[:-1]).max(-1) > 40  # [N-1, H, W]
    moving = changed.sum((1, 2)) > 20
    assert moving.sum() > 100

    def err(a, b):  # mean error over the changed pixels of each step pair
        return (np.abs(a - b).max(-1) * changed).sum((1, 2))[moving] / changed.sum((1, 2))[moving]

    assert (err(dec[1:], src[1:]) < err(dec[1:], src[:-1])).mean() > 0.9
    assert (err(dec[:-1], src[:-1]) < err(dec[:-1], src[1:])).mean() > 0.9


def test_several_files_chunks_and_tasks(tmp_path):
    """Small file limits force one Parquet/MP4 per episode and a second chunk directory; two tasks round-trip."""
    rng = np.random.default_rng(0)
    lengths = [7, 5, 9, 6]
    ends = np.cumsum(lengths)
    n = int(ends[-1])
    y, x = np.mgrid[0:32, 0:48]
    frames = np.stack([np.stack([(x * 5 + 4 * t) % 256, (y * 7) % 256, np.full_like(x, 9 * t % 256)], -1)
                       for t in range(n)]).astype(np.uint8)  # fmt: skip
    buffer = ReplayBuffer(
        {
            "agent_pos": rng.normal(size=(n, 3)).astype(np.float64),
            "action": rng.normal(size=(n, 2)).astype(np.float32),
            "reward": rng.random(n).astype(np.float32),
            "wrist": frames,
            "task": np.repeat([0, 1, 1, 0], lengths),  # per-step task ids, as MetaWorld MT10 stores them
        },
        ends,
    )
    path = write_lerobot(
        buffer, tmp_path / "ds", fps=20, task=["pick", "place"],
        task_key="task", vcodec="libx264", crf=18,
        data_files_size_in_mb=1e-4, video_files_size_in_mb=1e-4, chunks_size=2,
    )  # fmt: skip
    assert sorted(p.relative_to(path).as_posix() for p in path.glob("data/*/*.parquet")) == [
        "data/chunk-000/file-000.parquet",
        "data/chunk-000/file-001.parquet",
        "data/chunk-001/file-000.parquet",
        "data/chunk-001/file-001.parquet",
    ]
    assert len(list(path.glob("videos/observation.images.wrist/*/*.mp4"))) == 4
    info = load_info(path)
    assert info["features"]["observation.state"]["dtype"] == "float64" and info["total_tasks"] == 2
    assert info["features"]["next.reward"]["shape"] == [1] and "observation.task" not in info["features"]
    assert info["features"]["observation.images.wrist"]["info"]["video.codec"] == "h264"

    back = read_lerobot(path, key_map={"observation.state": "agent_pos"}, task_key="task")
    np.testing.assert_array_equal(back.episode_ends, ends)
    np.testing.assert_array_equal(back.data["agent_pos"], buffer.data["agent_pos"])
    np.testing.assert_array_equal(back.data["reward"], buffer.data["reward"][:, None])  # scalars come back [N, 1]
    np.testing.assert_array_equal(back.data["task"], buffer.data["task"])
    # Every decoded frame (4 files, 2 chunks) is nearest to its own source frame; the sawtooth pattern costs H.264
    # a few grey levels.
    dist = np.abs(back.data["wrist"][:, None].astype(np.int16) - frames[None]).mean(axis=(2, 3, 4))  # [N, N]
    np.testing.assert_array_equal(dist.argmin(axis=1), np.arange(n))
    assert dist.diagonal().mean() < 6.0
    episodes = pq.read_table(path / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    assert [e["tasks"] for e in episodes] == [["pick"], ["place"], ["place"], ["pick"]]
    assert [(e["data/chunk_index"], e["data/file_index"]) for e in episodes] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_channel_first_float_images_export_as_hwc(tmp_path):
    ramp = np.linspace(0, 1, 16 * 16 * 3, dtype=np.float32).reshape(3, 16, 16)
    buffer = ReplayBuffer({"image": np.stack([ramp] * 4), "action": np.zeros((4, 2), np.float32)}, [4])
    back = read_lerobot(write_lerobot(buffer, tmp_path / "ds", fps=10, vcodec="libx264", crf=0))
    assert back.data["image"].shape == (4, 16, 16, 3)
    expected = np.rint(np.moveaxis(ramp, 0, -1) * 255)
    assert np.abs(back.data["image"][0].astype(float) - expected).mean() < 3.0


def test_bad_metadata_is_a_clear_error(exported, tmp_path):
    import shutil

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(exported, dst)
        return dst

    missing = copy("missing")
    (missing / "meta" / "info.json").unlink()
    with pytest.raises(ValueError, match=r"not a LeRobot v3 dataset: .*meta/info.json is missing"):
        read_lerobot(missing)
    assert detect_format(missing) == "lerobot"  # the tree is still recognised, so the message is the right one

    corrupt = copy("corrupt")
    (corrupt / "meta" / "info.json").write_text('{"codebase_version": "v3.0", "fps": ')
    with pytest.raises(ValueError, match=r"info.json is not valid JSON"):
        read_lerobot(corrupt)

    def edit(name, change):
        ds = copy(name)
        info = json.loads((ds / "meta" / "info.json").read_text())
        change(info)
        (ds / "meta" / "info.json").write_text(json.dumps(info))
        return ds

    old = edit("old", lambda i: i.update(codebase_version="v2.1"))
    with pytest.raises(ValueError, match=r"codebase_version is 'v2.1', expected 'v3.x'"):
        read_lerobot(old)
    no_fps = edit("no_fps", lambda i: i.pop("fps"))
    with pytest.raises(ValueError, match=r"lacks \['fps'\]"):
        read_lerobot(no_fps)
    state = edit("state", lambda i: i["features"]["observation.state"].update(shape=[6]))
    with pytest.raises(ValueError, match=r"'observation.state': meta/info.json declares shape \[6\] .* holds 5 values"):
        read_lerobot(state)
    video = edit("video", lambda i: i["features"]["observation.images.img"].update(shape=[64, 64, 3]))
    with pytest.raises(ValueError, match=r"declares frames of 64x64 .* holds 96x96"):
        read_lerobot(video)
    frames = edit("frames", lambda i: i.update(total_frames=i["total_frames"] + 1))
    with pytest.raises(ValueError, match=r"info.json says \d+ frames, the data files hold"):
        read_lerobot(frames)


def test_reads_other_writers_variants(pusht_buffer, exported, tmp_path):
    """What other LeRobot writers produce: variable-length list columns (pandas), a bool and a string feature, a
    channels-first camera declaration, and the unnamed pandas index ``__index_level_0__`` in tasks.parquet."""
    import shutil

    import pyarrow as pa

    ds = tmp_path / "variant"
    shutil.copytree(exported, ds)
    data_file = ds / "data" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(data_file)
    n = table.num_rows
    state = pa.array(pusht_buffer.data["state"].tolist(), pa.list_(pa.float32()))
    table = table.set_column(table.schema.get_field_index("observation.state"), "observation.state", state)
    done = np.zeros(n, bool)
    done[pusht_buffer.episode_ends - 1] = True
    table = table.append_column("next.done", pa.array(done)).append_column("language", pa.array(["push"] * n))
    pq.write_table(table, data_file)
    pq.write_table(pa.table({"task_index": [0], "__index_level_0__": ["push"]}), ds / "meta" / "tasks.parquet")
    info = json.loads((ds / "meta" / "info.json").read_text())
    info["features"]["next.done"] = {"dtype": "bool", "shape": [1], "names": None}
    info["features"]["language"] = {"dtype": "string", "shape": [1], "names": None}
    info["features"]["observation.images.img"] |= {"shape": [3, 96, 96], "names": ["channels", "height", "width"]}
    (ds / "meta" / "info.json").write_text(json.dumps(info))

    back = read_lerobot(ds, key_map={"next.done": "done"})
    np.testing.assert_array_equal(back.data["state"], pusht_buffer.data["state"])
    np.testing.assert_array_equal(back.data["done"], done[:, None])
    assert "language" not in back.data and back.data["img"].shape == (n, 96, 96, 3)
    with pytest.raises(ValueError, match=r"features \['language'\] have dtype \['string'\]; only numeric and video"):
        read_lerobot(ds, features=["language"])
    assert dataset_info(ds)["tasks"] == ["push"]


def test_export_rejects_bad_input(pusht_buffer, tmp_path):
    with pytest.raises(ValueError, match="fps must be a positive integer"):
        write_lerobot(pusht_buffer, tmp_path / "a", fps=0)
    with pytest.raises(ValueError, match="vcodec must be one of"):
        write_lerobot(pusht_buffer, tmp_path / "a", fps=10, vcodec="mjpeg")
    with pytest.raises(ValueError, match="key_map: no buffer key 'joints'"):
        write_lerobot(pusht_buffer, tmp_path / "a", fps=10, key_map={"joints": "observation.state"})
    odd = ReplayBuffer({"cam": np.zeros((2, 15, 16, 3), np.uint8)}, [2])
    with pytest.raises(ValueError, match="needs even height and width"):
        write_lerobot(odd, tmp_path / "a", fps=10)
    assert not (tmp_path / "a").exists()  # nothing half-written under the target name


def test_formats_dispatch_and_summaries(pusht_buffer, exported, tmp_path, monkeypatch):
    small = ReplayBuffer({k: v[:200] for k, v in pusht_buffer.data.items()}, [161, 200])
    store = write_dataset(small, tmp_path / "small.zarr")
    assert detect_format(store) == "zarr" and detect_format(exported) == "lerobot"
    assert detect_format(tmp_path / "demo.hdf5") == "robomimic" and detect_format(tmp_path / "run.mcap") == "rosbag"
    with pytest.raises(ValueError, match="cannot tell the format of"):
        detect_format(tmp_path / "out")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['fsp'\] for writing lerobot"):
        write_dataset(small, tmp_path / "x", "lerobot", fsp=10)

    # The zarr summary streams blocks (here of 5000 values: one step of the image per block) and merges
    # them; it equals the one-block in-memory summary and numpy's figures.
    monkeypatch.setattr(formats, "_BLOCK_VALUES", 5000)
    streamed, in_memory = dataset_info(store), buffer_summary(small)
    assert streamed["n_episodes"] == 2 and streamed["episode_length"] == {"min": 39, "max": 161, "mean": 100.0}
    for key, s in in_memory["keys"].items():
        assert streamed["keys"][key]["shape"] == s["shape"] and streamed["keys"][key]["dtype"] == s["dtype"]
        for stat in ("min", "max", "mean", "std"):
            assert streamed["keys"][key][stat] == pytest.approx(s[stat], rel=1e-9)
    assert streamed["keys"]["img"]["per_channel"]["mean"] == pytest.approx(
        small.data["img"].reshape(-1, 3).mean(0).tolist()
    )
    state = small.data["state"].astype(np.float64)
    assert streamed["keys"]["state"]["per_dimension"]["std"] == pytest.approx(state.std(0).tolist())

    summary = dataset_info(exported)
    assert summary["format"] == "lerobot" and summary["fps"] == 10 and summary["n_steps"] == pusht_buffer.n_steps
    img = pusht_buffer.data["img"].astype(np.float64)
    assert summary["keys"]["observation.images.img"]["mean"] == pytest.approx(img.mean(), rel=1e-9)
    assert summary["keys"]["action"]["max"] == pytest.approx(float(pusht_buffer.data["action"].max()))

    # zarr <-> LeRobot through the dispatch.
    back = read_dataset(write_dataset(read_dataset(store), tmp_path / "lr", "lerobot", fps=10))
    np.testing.assert_array_equal(back.data["state"], small.data["state"])


def test_robomimic_and_rosbag_hooks(pusht_buffer, tmp_path):
    n = 50
    small = ReplayBuffer({"agent_pos": pusht_buffer.data["state"][:n, :2], "action": pusht_buffer.data["action"][:n]},
                         [20, n])  # fmt: skip
    if importlib.util.find_spec("data.robomimic") is None:
        (tmp_path / "demo.hdf5").touch()
        with pytest.raises(ValueError, match=r"no data/robomimic.py, which provides read_robomimic\(\)"):
            read_dataset(tmp_path / "demo.hdf5")
    else:  # robomimic HDF5 -> LeRobot through the dispatch, reader options passed on
        demo = write_dataset(small, tmp_path / "demo.hdf5", masks={"train": [1]})
        lerobot = write_dataset(read_dataset(demo, filter_key="train"), tmp_path / "lr", "lerobot", fps=20)
        back = read_dataset(lerobot)
        np.testing.assert_array_equal(back.episode_ends, [n - 20])
        np.testing.assert_array_equal(back.data["action"], small.data["action"][20:])
        np.testing.assert_array_equal(
            back.data["state"], small.data["agent_pos"][20:]
        )  # agent_pos -> observation.state
    with pytest.raises(ValueError, match="writing ROS bags is not supported"):
        write_dataset(small, tmp_path / "out.mcap")
