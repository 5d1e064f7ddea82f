"""Push-T demonstrations (Diffusion Policy's ``pusht_cchi_v7_replay.zarr``, 206 human episodes at 10 Hz).

Observation modes, identical to what ``envs.pusht.PushTEnv`` returns:
- ``state``: ``{"state": [20]}`` = the 9 block keypoints (x0, y0, ..., x8, y8) then agent x, y (Diffusion
  Policy's keypoint task);
- ``image``: ``{"image": [3, 96, 96] float in [0, 1], "agent_pos": [2]}``.
Actions are the commanded agent position in pixels, ``[2]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data.replay_buffer import ReplayBuffer
from data.sequence import SequenceDataset, split_episodes

PUSHT_FILE = Path("pusht") / "pusht_cchi_v7_replay.zarr"
OBS_MODES = ("state", "image")
DOWNLOAD_HINT = (
    "Get the data from https://diffusion-policy.cs.columbia.edu/data/training/pusht.zip (unzip; the store is "
    "pusht/pusht_cchi_v7_replay.zarr) and pass its path as task.dataset_path=<path> or set ROBODIFF_DATA to it "
    "(or to the directory holding pusht/)."
)


def shape_meta(obs_mode: str) -> dict:
    """Per-step shapes of observations and actions for an observation mode."""
    if obs_mode == "state":
        return {"obs": {"state": [20]}, "action": [2]}
    if obs_mode == "image":
        return {"obs": {"image": [3, 96, 96], "agent_pos": [2]}, "action": [2]}
    raise ValueError(f"obs_mode must be one of {OBS_MODES}, got '{obs_mode}'")


def resolve_pusht_path(path: str | os.PathLike | None = None) -> Path:
    """The explicit path, else ``$ROBODIFF_DATA``, else ``../shared/data`` beside the repository."""
    if path:
        tried = [Path(path).expanduser()]
    elif os.environ.get("ROBODIFF_DATA"):
        root = Path(os.environ["ROBODIFF_DATA"]).expanduser()
        tried = [root, root / PUSHT_FILE]
    else:
        repo = Path(__file__).resolve().parents[1]
        tried = [
            repo.parent / "shared" / "data" / PUSHT_FILE,
            Path.cwd().parent / "shared" / "data" / PUSHT_FILE,
        ]
    for candidate in tried:
        if (candidate / "meta").is_dir() and (candidate / "data").is_dir():
            return candidate
    raise FileNotFoundError(f"Push-T dataset not found; tried {', '.join(str(p) for p in tried)}. {DOWNLOAD_HINT}")


def load_pusht(path: str | os.PathLike | None, obs_mode: str) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """``(obs: {key: [N, ...]}, action: [N, 2], episode_ends: [E], sim_state: [N, 5])`` in the chosen observation
    mode; ``sim_state`` is the recorded simulator state (agent xy, block xy, block angle)."""
    shape_meta(obs_mode)  # validates obs_mode
    keys = ["state", "action"] + (["keypoint"] if obs_mode == "state" else ["img"])
    buf = ReplayBuffer.load(resolve_pusht_path(path), keys=keys, image_keys=["img"])
    agent_pos = buf.data["state"][:, :2].astype(np.float32)
    if obs_mode == "state":
        keypoints = buf.data["keypoint"].reshape(buf.n_steps, -1)
        obs = {"state": np.concatenate([keypoints, agent_pos], axis=1).astype(np.float32)}
    else:
        obs = {"image": buf.data["img"], "agent_pos": agent_pos}
    return obs, buf.data["action"].astype(np.float32), buf.episode_ends, buf.data["state"]


def next_step_index(episode_ends: np.ndarray) -> np.ndarray:
    """``[N]``: index of the step after each step, the last step of an episode mapping to itself (the state an
    episode's final action leads to is not recorded)."""
    ends = np.asarray(episode_ends, dtype=np.int64)
    nxt = np.arange(1, ends[-1] + 1) if len(ends) else np.zeros(0, np.int64)
    nxt[ends - 1] = ends - 1
    return nxt


def make_pusht_datasets(
    path: str | os.PathLike | None,
    obs_mode: str,
    *,
    horizon: int,
    n_obs_steps: int,
    n_action_steps: int,
    val_ratio: float = 0.02,
    seed: int = 42,
    max_train_episodes: int | None = None,
    train_range: tuple[int, int] | None = None,
    normalize_all: bool = False,
    reward_fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[SequenceDataset, SequenceDataset]:
    """Train and validation windows, split by episode (seeded) as in Diffusion Policy.

    ``reward_fn(next_state [N, 5]) -> (reward [N], terminal [N])`` adds transitions (see ``SequenceDataset``):
    step t's reward is computed from the recorded state after it (``envs.pusht`` supplies the environment's
    coverage reward; ``data`` does not import ``envs``)."""
    obs, action, episode_ends, sim_state = load_pusht(path, obs_mode)
    train_mask, val_mask = split_episodes(len(episode_ends), val_ratio, seed, max_train_episodes, train_range)
    kwargs = dict(
        horizon=horizon,
        n_obs_steps=n_obs_steps,
        n_action_steps=n_action_steps,
        image_keys=["image"] if obs_mode == "image" else [],
    )
    if reward_fn is not None:
        reward, terminal = reward_fn(sim_state[next_step_index(episode_ends)])
        kwargs.update(reward=reward, terminal=terminal)
    stats = np.ones(len(episode_ends), bool) if normalize_all else None
    train = SequenceDataset(obs, action, episode_ends, episode_mask=train_mask, stats_mask=stats, **kwargs)
    val = SequenceDataset(obs, action, episode_ends, episode_mask=val_mask, **kwargs)
    return train, val
