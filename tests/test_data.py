from __future__ import annotations

import numpy as np
import pytest
import torch

from data.normalizer import LinearNormalizer
from data.pusht import load_pusht, make_pusht_datasets, next_step_index, resolve_pusht_path
from data.replay_buffer import ReplayBuffer
from data.sequence import SequenceDataset, split_episodes, window_indices


def test_window_indices_pad_by_edge_repetition():
    # Two episodes of lengths 3 and 4 (steps 0..2 and 3..6), horizon 4, pad 1 before and 2 after.
    idx = window_indices(np.array([3, 7]), horizon=4, pad_before=1, pad_after=2)
    first_episode = idx[:3]
    # Starts -1..(3-4+2)=1: Diffusion Policy's SequenceSampler window starts.
    np.testing.assert_array_equal(first_episode, [[0, 0, 1, 2], [0, 1, 2, 2], [1, 2, 2, 2]])
    second = idx[3:]
    np.testing.assert_array_equal(second[0], [3, 3, 4, 5])  # starts one before: repeats step 3
    np.testing.assert_array_equal(second[-1], [5, 6, 6, 6])  # ends two after: repeats step 6
    assert len(second) == (4 - 4 + 2) - (-1) + 1
    # Windows never cross episodes.
    assert ((idx < 3).all(axis=1) | (idx >= 3).all(axis=1)).all()


def test_window_indices_mask_and_errors():
    idx = window_indices(np.array([3, 7]), horizon=2, episode_mask=np.array([False, True]))
    assert idx.min() >= 3
    with pytest.raises(ValueError, match="horizon must be >= 1, got 0"):
        window_indices(np.array([3]), horizon=0)
    with pytest.raises(ValueError, match="episode_mask has shape"):
        window_indices(np.array([3, 7]), horizon=2, episode_mask=np.array([True]))


def test_split_episodes_disjoint_seeded_and_downsampled():
    train, val = split_episodes(206, 0.02, seed=42)
    assert not (train & val).any() and (train | val).all()
    assert val.sum() == 4
    train2, val2 = split_episodes(206, 0.02, seed=42)
    np.testing.assert_array_equal(val, val2)
    _, val3 = split_episodes(206, 0.02, seed=1)
    assert not np.array_equal(val, val3)
    train90, val90 = split_episodes(206, 0.02, seed=42, max_train_episodes=90)
    assert train90.sum() == 90 and not (train90 & val90).any()
    np.testing.assert_array_equal(val90, val)
    with pytest.raises(ValueError, match="val_ratio must be in"):
        split_episodes(10, 1.5, seed=0)


def test_split_episodes_train_range_keeps_the_validation_split():
    train, val = split_episodes(206, 0.02, seed=42)
    first, val_a = split_episodes(206, 0.02, seed=42, train_range=(0, 103))
    second, val_b = split_episodes(206, 0.02, seed=42, train_range=[103, 206])
    np.testing.assert_array_equal(val_a, val)
    np.testing.assert_array_equal(val_b, val)
    assert not (first & second).any() and np.array_equal(first | second, train)
    assert np.flatnonzero(first).max() < 103 <= np.flatnonzero(second).min()
    sub, _ = split_episodes(206, 0.02, seed=42, max_train_episodes=40, train_range=(103, 206))
    assert sub.sum() == 40 and np.flatnonzero(sub).min() >= 103
    for bad, match in (((5, 5), "0 <= start < stop <= 206"), ((0, 300), "<= 206"), ((1,), "two episode indices")):
        with pytest.raises(ValueError, match=match):
            split_episodes(206, 0.02, seed=42, train_range=bad)
    only_val = int(np.flatnonzero(val)[0])
    with pytest.raises(ValueError, match="only validation episodes"):
        split_episodes(206, 0.02, seed=42, train_range=(only_val, only_val + 1))


def test_stats_mask_sets_the_steps_of_normalizer_data():
    n = 10
    steps = np.arange(n, dtype=np.float32)[:, None]
    kwargs = dict(horizon=2, n_obs_steps=1, n_action_steps=1)
    ends, first = np.array([4, 10]), np.array([True, False])
    own = SequenceDataset({"state": steps}, steps, ends, episode_mask=first, **kwargs).normalizer_data()
    assert own["action"].max() == 3 and len(own["action"]) == 4
    every = SequenceDataset(
        {"state": steps}, steps, ends, episode_mask=first, stats_mask=np.ones(2, bool), **kwargs
    ).normalizer_data()
    np.testing.assert_array_equal(every["action"][:, 0], np.arange(n))
    np.testing.assert_array_equal(every["state"][:, 0], np.arange(n))


def test_sequence_dataset_batch_layout():
    n = 10
    obs = {"state": np.arange(n, dtype=np.float32)[:, None].repeat(3, 1), "image": np.full((n, 4, 4, 3), 255, np.uint8)}
    action = np.arange(n, dtype=np.float32)[:, None].repeat(2, 1)
    ds = SequenceDataset(
        obs, action, np.array([4, 10]), horizon=4, n_obs_steps=2, n_action_steps=2, image_keys=["image"]
    )
    batch = ds.get_batch(torch.arange(len(ds)))
    assert batch["obs"]["state"].shape == (len(ds), 2, 3)
    assert batch["obs"]["image"].shape == (len(ds), 2, 3, 4, 4) and batch["obs"]["image"].max() == 1.0
    assert batch["action"].shape == (len(ds), 4, 2)
    # First window: padded one step before the start (n_obs_steps - 1), obs are the first two steps.
    np.testing.assert_array_equal(batch["obs"]["state"][0, :, 0], [0, 0])
    np.testing.assert_array_equal(batch["action"][0, :, 0], [0, 0, 1, 2])
    item = ds[0]
    assert item["action"].shape == (4, 2) and item["obs"]["state"].shape == (2, 3)
    stats = ds.normalizer_data()
    assert set(stats) == {"state", "action"} and len(stats["action"]) == n


def test_sequence_dataset_transitions():
    # Two episodes of 4 and 6 steps; obs = action = reward = step index, so every gathered value names its step.
    n, To, Ta, H = 10, 2, 2, 4
    steps = np.arange(n, dtype=np.float32)
    terminal = np.zeros(n, np.float32)
    terminal[8] = 1.0
    kwargs = dict(horizon=H, n_obs_steps=To, n_action_steps=Ta)
    plain = SequenceDataset({"state": steps[:, None]}, steps[:, None], np.array([4, 10]), **kwargs)
    ds = SequenceDataset(
        {"state": steps[:, None]}, steps[:, None], np.array([4, 10]), reward=steps, terminal=terminal, **kwargs
    )
    # The same windows as without transitions.
    assert torch.equal(ds.indices[:, :H], plain.indices)
    b = ds.get_batch(torch.arange(len(ds)))
    assert set(b) == {"obs", "action", "reward", "terminal", "next_obs"}
    # First window of episode 0: obs steps [0, 0] (padded), executed actions are steps 0, 1 (chunk[To-1:To-1+Ta]),
    # next obs window ends after them: [1, 2].
    np.testing.assert_array_equal(b["obs"]["state"][0, :, 0], [0, 0])
    np.testing.assert_array_equal(b["reward"][0], [0, 1])
    np.testing.assert_array_equal(b["next_obs"]["state"][0, :, 0], [1, 2])
    # Last window of episode 0 (starts at step 1: obs [1, 2]) executes steps 2, 3; its next window would be [3, 4]
    # and is clamped to the episode's last step, never crossing into episode 1.
    np.testing.assert_array_equal(b["obs"]["state"][2, :, 0], [1, 2])
    np.testing.assert_array_equal(b["reward"][2], [2, 3])
    np.testing.assert_array_equal(b["next_obs"]["state"][2, :, 0], [3, 3])
    np.testing.assert_array_equal(b["obs"]["state"][3, :, 0], [4, 4])  # window 3 is episode 1's first
    # Terminal flags travel with the executed steps.
    hit = b["reward"] == 8
    assert torch.equal(b["terminal"][hit], torch.ones(int(hit.sum())))
    assert b["terminal"][~hit].sum() == 0
    item = ds[1]
    assert item["reward"].shape == (Ta,) and item["next_obs"]["state"].shape == (To, 1)
    with pytest.raises(ValueError, match="reward and terminal must be given together"):
        SequenceDataset({"state": steps[:, None]}, steps[:, None], np.array([10]), reward=steps, **kwargs)
    with pytest.raises(ValueError, match=r"must have shape \[10\]"):
        SequenceDataset(
            {"state": steps[:, None]}, steps[:, None], np.array([10]), reward=steps[:5], terminal=terminal[:5], **kwargs
        )


def test_next_step_index_stays_in_episode():
    np.testing.assert_array_equal(next_step_index(np.array([3, 5])), [1, 2, 2, 4, 4])


def test_normalizer_round_trip_and_identity():
    x = torch.randn(100, 3) * torch.tensor([1.0, 10.0, 0.0]) + 5.0  # third dim constant
    norm = LinearNormalizer({"x": 3, "y": 2})
    with pytest.raises(RuntimeError, match="before fit"):
        norm.normalize("x", x)
    norm.fit({"x": x, "y": torch.randn(10, 2)}, identity_keys=["y"])
    z = norm.normalize("x", x)
    assert torch.allclose(z[:, :2].min(0).values, torch.tensor(-1.0)) and torch.allclose(
        z[:, :2].max(0).values, torch.tensor(1.0)
    )
    assert torch.allclose(z[:, 2], torch.zeros(100))  # constant dimension: shifted, not blown up
    assert torch.allclose(norm.unnormalize("x", z), x, atol=1e-5)
    y = torch.randn(4, 2)
    assert torch.equal(norm.normalize("y", y), y)
    with pytest.raises(ValueError, match="expected 3"):
        norm.normalize("x", torch.zeros(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        LinearNormalizer({"x": 1}).fit({"x": torch.tensor([[float("nan")]])})
    # Statistics are buffers: they travel in the state dict.
    fresh = LinearNormalizer({"x": 3, "y": 2})
    fresh.load_state_dict(norm.state_dict())
    assert torch.equal(fresh.normalize("x", x), z)


def test_replay_buffer_append_save_load_round_trip(tmp_path):
    buf = ReplayBuffer()
    rng = np.random.default_rng(0)
    eps = [
        {"obs": rng.normal(size=(n, 3)).astype(np.float32), "img": rng.integers(0, 255, (n, 2, 2, 3), np.uint8)}
        for n in (5, 7)
    ]
    for ep in eps:
        buf.add_episode(ep)
    assert buf.n_episodes == 2 and buf.n_steps == 12
    np.testing.assert_array_equal(buf.episode_ends, [5, 12])
    path = buf.save(tmp_path / "buf.zarr")
    import zarr

    assert zarr.open_group(str(path), mode="r").metadata.zarr_format == 3
    loaded = ReplayBuffer.load(path)
    for i, ep in enumerate(eps):
        got = loaded.get_episode(i)
        np.testing.assert_array_equal(got["obs"], ep["obs"])
        np.testing.assert_array_equal(got["img"], ep["img"])
    # Overwriting is atomic and leaves no temporary directories.
    buf.add_episode(eps[0])
    buf.save(path)
    assert ReplayBuffer.load(path).n_episodes == 3
    assert [p.name for p in tmp_path.iterdir()] == ["buf.zarr"]
    with pytest.raises(ValueError, match="differ from buffer keys"):
        buf.add_episode({"obs": eps[0]["obs"]})
    with pytest.raises(ValueError, match="equal length"):
        buf.add_episode({"obs": eps[0]["obs"], "img": eps[1]["img"]})


def test_load_shared_pusht_zarr_v2(pusht_path):
    buf = ReplayBuffer.load(pusht_path, keys=["action", "img"], image_keys=["img"])
    assert buf.n_episodes == 206 and buf.n_steps == 25650
    assert buf.data["img"].dtype == np.uint8 and buf.data["img"].shape == (25650, 96, 96, 3)
    assert buf.episode_lengths.min() == 49 and buf.episode_lengths.max() == 246
    with pytest.raises(KeyError, match="no data/nope"):
        ReplayBuffer.load(pusht_path, keys=["nope"])


def test_pusht_state_obs_layout(pusht_path):
    obs, action, ends, sim_state = load_pusht(pusht_path, "state")
    import zarr

    g = zarr.open_group(str(pusht_path), mode="r")
    np.testing.assert_array_equal(obs["state"][:5, :18], g["data/keypoint"][:5].reshape(5, 18))
    np.testing.assert_array_equal(obs["state"][:5, 18:], g["data/state"][:5, :2])
    assert action.shape == (25650, 2) and len(ends) == 206
    train, val = make_pusht_datasets(
        pusht_path, "state", horizon=16, n_obs_steps=2, n_action_steps=8, max_train_episodes=90
    )
    assert len(np.unique(np.searchsorted(ends, train.indices[:, 0].numpy(), side="right"))) == 90
    assert len(val) > 0


def test_pusht_disjoint_halves_share_the_normalization_of_all_episodes(pusht_path):
    from envs.tasks import TaskConfig, make_task

    def train_set(episodes, normalize):
        config = TaskConfig(
            name="pusht_state", dataset_path=str(pusht_path), train_episodes=episodes, normalizer_episodes=normalize
        )
        return make_task(config).datasets(horizon=16, n_obs_steps=2, n_action_steps=8)[0]

    a, b = train_set([0, 103], "all"), train_set([103, 206], "all")
    assert set(a.indices.flatten().tolist()).isdisjoint(b.indices.flatten().tolist())
    stats_a, stats_b = a.normalizer_data(), b.normalizer_data()
    for key in ("action", "state"):
        np.testing.assert_array_equal(stats_a[key], stats_b[key])
        assert len(stats_a[key]) == 25650  # every step of the 206 episodes
    own_a, own_b = train_set([0, 103], "train").normalizer_data(), train_set([103, 206], "train").normalizer_data()
    assert len(own_a["action"]) + len(own_b["action"]) < 25650  # the validation episodes are in neither
    assert not torch.equal(own_a["action"].amax(0), own_b["action"].amax(0))
    with pytest.raises(ValueError, match="normalizer_episodes must be 'train' or 'all', got 'some'"):
        TaskConfig(normalizer_episodes="some")


def test_missing_dataset_names_path_and_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.zarr.*pusht\.zip"):
        resolve_pusht_path(tmp_path / "nowhere.zarr")
    monkeypatch.setenv("ROBODIFF_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        resolve_pusht_path()
    with pytest.raises(ValueError, match="obs_mode must be one of"):
        load_pusht(tmp_path, "depth")
