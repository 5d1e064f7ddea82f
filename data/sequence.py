"""Windowed sampling over episodes with Diffusion Policy's padding semantics.

A training sample is a window of ``horizon`` consecutive steps of one episode. Windows may start up to
``pad_before`` steps before the episode start and end up to ``pad_after`` steps after its end; the missing steps
repeat the first/last step of the episode (Diffusion Policy's ``SequenceSampler``). Edge repetition is the same as
clamping the step index into the episode, so every window is one row of absolute indices and a batch is a single
gather: no per-sample Python work, no DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from einops import rearrange


def window_indices(
    episode_ends: np.ndarray, horizon: int, pad_before: int = 0, pad_after: int = 0, episode_mask=None
) -> np.ndarray:
    """Absolute step indices ``[n_windows, horizon]`` of every window in the selected episodes."""
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if pad_before < 0 or pad_after < 0:
        raise ValueError(f"pad_before and pad_after must be >= 0, got {pad_before}, {pad_after}")
    episode_ends = np.asarray(episode_ends, dtype=np.int64)
    mask = np.ones(len(episode_ends), bool) if episode_mask is None else np.asarray(episode_mask, bool)
    if mask.shape != episode_ends.shape:
        raise ValueError(f"episode_mask has shape {mask.shape}, expected {episode_ends.shape}")
    starts = np.concatenate([[0], episode_ends[:-1]])
    offsets = np.arange(horizon)
    rows = []
    for start, end in zip(starts[mask], episode_ends[mask], strict=True):
        length = end - start
        first = np.arange(-pad_before, length - horizon + pad_after + 1)  # window start offsets
        rows.append(start + np.clip(first[:, None] + offsets, 0, length - 1))
    return np.concatenate(rows) if rows else np.zeros((0, horizon), np.int64)


def split_episodes(
    n_episodes: int,
    val_ratio: float,
    seed: int,
    max_train_episodes: int | None = None,
    train_range: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (train, val) episode masks, as Diffusion Policy's ``get_val_mask`` + ``downsample_mask``.

    At least one validation episode when ``val_ratio > 0`` and at least one training episode. ``train_range
    (start, stop)`` keeps only training episodes with an index in [start, stop) (the validation split does not
    change, so policies trained on disjoint ranges are validated alike); then, with ``max_train_episodes``, the
    training episodes are a seeded random subset of that size.
    """
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    if max_train_episodes is not None and max_train_episodes < 1:
        raise ValueError(f"max_train_episodes must be >= 1 or null, got {max_train_episodes}")
    rng = np.random.default_rng(seed)
    val = np.zeros(n_episodes, bool)
    if val_ratio > 0 and n_episodes > 1:
        n_val = min(max(1, round(n_episodes * val_ratio)), n_episodes - 1)
        val[rng.choice(n_episodes, size=n_val, replace=False)] = True
    train = ~val
    if train_range is not None:
        start, stop = _check_range(train_range, n_episodes)
        train[:start] = False
        train[stop:] = False
        if not train.any():
            raise ValueError(
                f"train_episodes [{start}, {stop}) holds only validation episodes; widen the range or lower val_ratio"
            )
    if max_train_episodes is not None and train.sum() > max_train_episodes:
        idx = np.flatnonzero(train)
        keep = idx[np.random.default_rng(seed).choice(len(idx), size=max_train_episodes, replace=False)]
        train = np.zeros(n_episodes, bool)
        train[keep] = True
    return train, val


def _check_range(episode_range, n_episodes: int) -> tuple[int, int]:
    r = list(episode_range)
    if len(r) != 2 or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in r):
        raise ValueError(f"train_episodes must be two episode indices [start, stop), got {episode_range!r}")
    start, stop = int(r[0]), int(r[1])
    if not 0 <= start < stop <= n_episodes:
        raise ValueError(
            f"train_episodes [{start}, {stop}) must satisfy 0 <= start < stop <= {n_episodes} (episodes in the data)"
        )
    return start, stop


class SequenceDataset(torch.utils.data.Dataset):
    """Windows over in-memory arrays. Item/batch: ``{"obs": {k: [B, To, ...]}, "action": [B, H, Da]}``.

    ``obs``: per-step arrays ``[N, ...]``; ``image_keys`` are uint8 ``[N, h, w, 3]`` and come out float32
    ``[.., 3, h, w]`` in [0, 1]. Observations are the first ``n_obs_steps`` steps of the window, actions all
    ``horizon`` steps (Diffusion Policy pads ``n_obs_steps - 1`` before and ``n_action_steps - 1`` after).

    Transitions (offline RL): with per-step ``reward [N]`` and ``terminal [N]`` (step t's reward and whether the
    state it leads to is terminal), batches also carry, for the chunk ``action[:, To-1 : To-1+Ta]`` that the
    executor runs (Ta = ``n_action_steps``):
      ``reward [B, Ta]``, ``terminal [B, Ta]`` (float32) of those steps, and
      ``next_obs {k: [B, To, ...]}``, the observation window Ta steps later (where the next chunk is predicted).
    Windows are then built ``Ta`` steps longer with ``Ta`` more end padding: the same windows (their first
    ``horizon`` columns are identical), each extended by the steps a transition needs, clamped at the episode end.
    """

    def __init__(
        self,
        obs: Mapping[str, np.ndarray],
        action: np.ndarray,
        episode_ends: np.ndarray,
        *,
        horizon: int,
        n_obs_steps: int,
        n_action_steps: int,
        episode_mask: np.ndarray | None = None,
        image_keys: Iterable[str] = (),
        reward: np.ndarray | None = None,
        terminal: np.ndarray | None = None,
        stats_mask: np.ndarray | None = None,
    ) -> None:
        if not 1 <= n_obs_steps <= horizon:
            raise ValueError(f"n_obs_steps must be in [1, horizon={horizon}], got {n_obs_steps}")
        if not 1 <= n_action_steps <= horizon:
            raise ValueError(f"n_action_steps must be in [1, horizon={horizon}], got {n_action_steps}")
        self.obs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in obs.items()}
        self.action = torch.from_numpy(np.ascontiguousarray(action, dtype=np.float32))
        self.image_keys = frozenset(image_keys)
        self.n_obs_steps, self.n_action_steps, self.horizon = n_obs_steps, n_action_steps, horizon
        if (reward is None) != (terminal is None):
            raise ValueError("reward and terminal must be given together (per-step arrays [N]) or not at all")
        self.reward = self.terminal = None
        extra = 0
        if reward is not None:
            n = len(self.action)
            if np.shape(reward) != (n,) or np.shape(terminal) != (n,):
                raise ValueError(
                    f"reward and terminal must have shape [{n}] (one per step), got {np.shape(reward)} and "
                    f"{np.shape(terminal)}"
                )
            self.reward = torch.as_tensor(np.asarray(reward, dtype=np.float32))
            self.terminal = torch.as_tensor(np.asarray(terminal, dtype=np.float32))
            extra = n_action_steps
        # [n_windows, horizon (+ Ta with transitions)] absolute step indices
        self.indices = torch.from_numpy(
            window_indices(episode_ends, horizon + extra, n_obs_steps - 1, n_action_steps - 1 + extra, episode_mask)
        )
        # Every step of these episodes is what normalizer_data covers (None: the windows' own steps).
        self._stats_episodes = None if stats_mask is None else (np.asarray(episode_ends), np.asarray(stats_mask, bool))
        if stats_mask is not None and self._stats_episodes[1].shape != np.shape(episode_ends):
            raise ValueError(f"stats_mask has shape {np.shape(stats_mask)}, expected {np.shape(episode_ends)}")

    def __len__(self) -> int:
        return len(self.indices)

    def get_batch(self, idx: torch.Tensor) -> dict:
        """Gather windows ``idx: [B]`` into a batch."""
        rows = self.indices[idx]  # [B, H (+ Ta)]
        To, Ta = self.n_obs_steps, self.n_action_steps
        batch = {"obs": self._obs(rows[:, :To]), "action": self.action[rows[:, : self.horizon]]}
        if self.reward is not None:
            executed = rows[:, To - 1 : To - 1 + Ta]  # [B, Ta]
            batch["reward"] = self.reward[executed]
            batch["terminal"] = self.terminal[executed]
            batch["next_obs"] = self._obs(rows[:, Ta : Ta + To])
        return batch

    def _obs(self, obs_rows: torch.Tensor) -> dict[str, torch.Tensor]:
        obs = {}
        for key, arr in self.obs.items():
            x = arr[obs_rows]
            if key in self.image_keys:
                x = rearrange(x, "b t h w c -> b t c h w").float().div_(255.0)
            # integer keys (task ids for an embedding, e.g. MoDE's task token) keep their dtype
            obs[key] = x if x.dtype in (torch.float32, torch.int64) else x.float()
        return obs

    def __getitem__(self, i: int) -> dict:
        batch = self.get_batch(torch.tensor([i]))
        return {k: {kk: vv[0] for kk, vv in v.items()} if isinstance(v, dict) else v[0] for k, v in batch.items()}

    def normalizer_data(self) -> dict[str, torch.Tensor]:
        """Every low-dimensional key (observations and ``action``) over the steps this dataset covers, or over the
        episodes of ``stats_mask`` when given (e.g. every episode of the file, so that policies trained on
        different subsets share one normalization and can be composed)."""
        if self._stats_episodes is None:
            steps = torch.unique(self.indices)
        else:
            ends, mask = self._stats_episodes
            steps = torch.from_numpy(window_indices(ends, 1, episode_mask=mask)[:, 0])  # each step once, in order
        out = {k: v[steps].float() for k, v in self.obs.items() if k not in self.image_keys}
        out["action"] = self.action[steps]
        return out

    def iterate(
        self,
        batch_size: int,
        generator: torch.Generator,
        drop_last: bool = True,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        """One epoch of shuffled batches, skipping the first ``start_batch`` (to continue an epoch on resume).

        Data-parallel training: every rank passes the same ``generator`` seed, so all draw one permutation, and
        takes the ``rank``-th of ``world_size`` equal slices of each batch: ``batch_size`` is the global batch, and
        the ranks together see exactly the batches of one process (``batch_size / world_size`` windows each)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size % world_size:
            raise ValueError(
                f"batch_size={batch_size} must be divisible by world_size={world_size} (it is the global batch)"
            )
        perm = torch.randperm(len(self), generator=generator)
        stop = len(perm) - batch_size + 1 if drop_last else len(perm)
        for start in range(start_batch * batch_size, max(stop, 0), batch_size):
            yield self.get_batch(perm[start : start + batch_size].tensor_split(world_size)[rank])
