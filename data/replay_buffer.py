"""Episodic replay buffer in Diffusion Policy's zarr layout.

Layout (Chi et al. 2023): ``data/<key>`` arrays of shape ``[N, ...]`` holding all episodes back to back, and
``meta/episode_ends`` ``[E]`` with the exclusive end index of each episode. Reading accepts zarr format 2 (the
published Push-T data) and 3; writing produces format 3. Writes are atomic (``data.io.atomic_directory``):
an interrupted save never leaves a half-written store under the target name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import zarr

from data.io import atomic_directory

# Reading a float32 image array in slices keeps peak memory near the uint8 result instead of 4x it.
_READ_CHUNK = 2048


class ReplayBuffer:
    """In-memory episodes: ``data[key]: [N, ...]`` and ``episode_ends: [E]`` (exclusive, increasing)."""

    def __init__(self, data: Mapping[str, np.ndarray] | None = None, episode_ends: Iterable[int] = ()) -> None:
        self.data: dict[str, np.ndarray] = dict(data or {})
        self.episode_ends = np.asarray(list(episode_ends), dtype=np.int64)
        self._validate()

    def _validate(self) -> None:
        n = int(self.episode_ends[-1]) if len(self.episode_ends) else 0
        if len(self.episode_ends) and np.any(np.diff(np.concatenate([[0], self.episode_ends])) <= 0):
            raise ValueError(f"episode_ends must be strictly increasing and positive, got {self.episode_ends}")
        for key, arr in self.data.items():
            if len(arr) != n:
                raise ValueError(f"data/{key} has {len(arr)} steps but episode_ends[-1] is {n}")

    # -- reading ---------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, keys: Iterable[str] | None = None, image_keys: Iterable[str] = ()) -> ReplayBuffer:
        """Copy a zarr store into memory. ``image_keys`` are converted to uint8 (values 0..255)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no replay buffer at {path}")
        root = zarr.open_group(str(path), mode="r")
        if "data" not in root or "meta" not in root or "episode_ends" not in root["meta"]:
            raise ValueError(f"{path} is not a replay buffer: expected groups data/ and meta/episode_ends")
        group = root["data"]
        available = sorted(group.array_keys())
        keys = available if keys is None else list(keys)
        missing = [k for k in keys if k not in available]
        if missing:
            raise KeyError(f"{path} has no data/{missing[0]}; available keys: {available}")
        image_keys = set(image_keys)
        data = {}
        for key in keys:
            arr = group[key]
            if key in image_keys:
                out = np.empty(arr.shape, dtype=np.uint8)
                for start in range(0, arr.shape[0], _READ_CHUNK):
                    block = arr[start : start + _READ_CHUNK]
                    out[start : start + len(block)] = np.clip(np.rint(block), 0, 255)
                data[key] = out
            else:
                data[key] = arr[:]
        return cls(data, root["meta"]["episode_ends"][:])

    @property
    def n_steps(self) -> int:
        return int(self.episode_ends[-1]) if len(self.episode_ends) else 0

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ends)

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(np.concatenate([[0], self.episode_ends]))

    def episode_slice(self, i: int) -> slice:
        if not -self.n_episodes <= i < self.n_episodes:
            raise IndexError(f"episode {i} out of range for {self.n_episodes} episodes")
        i %= self.n_episodes
        start = int(self.episode_ends[i - 1]) if i > 0 else 0
        return slice(start, int(self.episode_ends[i]))

    def get_episode(self, i: int) -> dict[str, np.ndarray]:
        s = self.episode_slice(i)
        return {k: v[s] for k, v in self.data.items()}

    # -- writing ---------------------------------------------------------------------------------------------
    def add_episode(self, episode: Mapping[str, np.ndarray]) -> None:
        """Append one episode; every key must be present with the same length and per-step shape."""
        lengths = {k: len(v) for k, v in episode.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"episode arrays must have equal length, got {lengths}")
        length = next(iter(lengths.values()))
        if length == 0:
            raise ValueError("cannot add an empty episode")
        if self.data:
            if set(episode) != set(self.data):
                raise ValueError(f"episode keys {sorted(episode)} differ from buffer keys {sorted(self.data)}")
            for k, v in episode.items():
                if v.shape[1:] != self.data[k].shape[1:]:
                    raise ValueError(f"{k}: per-step shape {v.shape[1:]} != buffer's {self.data[k].shape[1:]}")
            self.data = {k: np.concatenate([self.data[k], np.asarray(episode[k])]) for k in self.data}
        else:
            self.data = {k: np.asarray(v).copy() for k, v in episode.items()}
        self.episode_ends = np.append(self.episode_ends, self.n_steps + length)

    def save(self, path: str | Path, chunk_steps: int = 1000) -> Path:
        """Write a zarr format-3 store atomically (temporary sibling directory, then rename)."""
        path = Path(path)
        with atomic_directory(path) as tmp:
            root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            data = root.create_group("data")
            for key, arr in self.data.items():
                chunks = (min(chunk_steps, max(len(arr), 1)), *arr.shape[1:])
                data.create_array(key, shape=arr.shape, dtype=arr.dtype, chunks=chunks)[...] = arr
            meta = root.create_group("meta")
            ends = meta.create_array("episode_ends", shape=self.episode_ends.shape, dtype=np.int64)
            ends[...] = self.episode_ends
        return path
