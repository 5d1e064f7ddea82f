"""robomimic HDF5 datasets (Mandlekar et al. 2021) <-> ``ReplayBuffer``.

Layout (robomimic docs, "Dataset Structure"):
``data/`` with attributes ``total`` (steps over all demos) and ``env_args`` (JSON: ``env_name``, ``type``,
``env_kwargs``); one group per demonstration ``data/demo_<i>`` with attribute ``num_samples`` and datasets
``actions [T, Da]``, ``rewards [T]``, ``dones [T]``, ``states [T, S]`` (flattened simulator states),
``obs/<key> [T, ...]`` and ``next_obs/<key> [T, ...]``; filter keys ``mask/<name>``: arrays of demo names (bytes),
e.g. ``mask/train``, ``mask/valid``. Demos are ordered by the number in their name, as robomimic orders them.

Buffer keys: ``action`` <-> ``actions``, ``reward`` <-> ``rewards``, ``done`` <-> ``dones``, ``state`` <-> ``states``;
every other buffer key is an observation ``obs/<key>``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from data.io import atomic_file
from data.replay_buffer import ReplayBuffer

# buffer key -> per-demo dataset name
PER_STEP = {"action": "actions", "reward": "rewards", "done": "dones", "state": "states"}
_DEMO = re.compile(r"^demo_(\d+)$")


def _h5py():
    import h5py  # optional dependency: only robomimic conversion needs it

    return h5py


def read_robomimic(
    path: str | os.PathLike, filter_key: str | None = None, obs_keys: Iterable[str] | None = None
) -> ReplayBuffer:
    """Every demo (or those listed in ``mask/<filter_key>``) as one episode each, in demo-number order.

    ``obs_keys``: observation keys to load (default all of the first demo's); ``rewards``, ``dones`` and
    ``states`` are loaded when every selected demo has them."""
    h5py = _h5py()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no robomimic dataset at {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not an HDF5 file (robomimic datasets are HDF5): {e}") from e
    with f:
        if "data" not in f or not isinstance(f["data"], h5py.Group):
            raise ValueError(f"{path} is not a robomimic dataset: expected a group data/ with demo_<i> groups")
        demos = sorted((k for k in f["data"] if _DEMO.match(k)), key=lambda k: int(_DEMO.match(k).group(1)))
        if not demos:
            raise ValueError(f"{path} has no demonstrations: expected groups data/demo_<i>, found {list(f['data'])}")
        if filter_key is not None:
            available = sorted(f["mask"]) if "mask" in f else []
            if filter_key not in available:
                raise ValueError(f"{path} has no filter key mask/{filter_key}; available filter keys: {available}")
            selected = {name.decode() if isinstance(name, bytes) else str(name) for name in f["mask"][filter_key][:]}
            unknown = sorted(selected - set(demos))
            if unknown:
                raise ValueError(f"{path}: mask/{filter_key} names demos that do not exist: {unknown[:5]}")
            demos = [d for d in demos if d in selected]
            if not demos:
                raise ValueError(f"{path}: mask/{filter_key} selects no demonstrations")
        first = f["data"][demos[0]]
        if "obs" not in first:
            raise ValueError(f"{path}: data/{demos[0]} has no obs/ group")
        keys = sorted(first["obs"]) if obs_keys is None else list(obs_keys)
        clashes = [k for k in keys if k in PER_STEP]
        if clashes:
            raise ValueError(
                f"{path}: observation keys {clashes} clash with the buffer's per-step keys {list(PER_STEP)}"
            )
        extras = [k for k in ("reward", "done", "state") if all(PER_STEP[k] in f["data"][d] for d in demos)]
        data: dict[str, list[np.ndarray]] = {k: [] for k in [*keys, "action", *extras]}
        ends, total = [], 0
        for demo in demos:
            group = f["data"][demo]
            if "actions" not in group:
                raise ValueError(f"{path}: data/{demo} has no actions dataset")
            length = len(group["actions"])
            if length == 0:
                raise ValueError(f"{path}: data/{demo} is empty (0 actions)")
            arrays = {"action": group["actions"][:]}
            for k in keys:
                if k not in group["obs"]:
                    raise ValueError(f"{path}: data/{demo}/obs has no key {k!r}; it has {sorted(group['obs'])}")
                arrays[k] = group["obs"][k][:]
            arrays.update({k: group[PER_STEP[k]][:] for k in extras})
            for k, arr in arrays.items():
                if len(arr) != length:
                    raise ValueError(f"{path}: data/{demo}: {k} has {len(arr)} steps but actions has {length}")
                data[k].append(arr)
            total += length
            ends.append(total)
    return ReplayBuffer({k: np.concatenate(v) for k, v in data.items()}, ends)


def write_robomimic(
    buffer: ReplayBuffer,
    path: str | os.PathLike,
    env_args: dict | None = None,
    masks: dict[str, list[int]] | None = None,
) -> Path:
    """Write ``buffer`` (needs ``action``) as robomimic HDF5, atomically (temporary sibling file, then rename).

    ``masks``: filter-key name -> episode indices, stored as ``mask/<name>`` demo names. ``next_obs`` repeats an
    episode's last observation at its end (robomimic's convention for the final step)."""
    h5py = _h5py()
    path = Path(path)
    if "action" not in buffer.data:
        raise ValueError(f"write_robomimic needs an 'action' key in the buffer; it has {sorted(buffer.data)}")
    if buffer.n_episodes == 0:
        raise ValueError("write_robomimic got an empty buffer (0 episodes)")
    for name, episodes in (masks or {}).items():
        bad = [i for i in episodes if not 0 <= int(i) < buffer.n_episodes]
        if bad:
            raise ValueError(f"mask {name!r} has episode indices {bad[:5]} outside [0, {buffer.n_episodes})")
    obs_keys = [k for k in buffer.data if k not in PER_STEP]
    with atomic_file(path) as tmp, h5py.File(tmp, "w") as f:
        data = f.create_group("data")
        data.attrs["total"] = buffer.n_steps
        data.attrs["env_args"] = json.dumps(env_args or {})
        for i in range(buffer.n_episodes):
            episode = buffer.get_episode(i)
            demo = data.create_group(f"demo_{i}")
            demo.attrs["num_samples"] = len(episode["action"])
            for key, name in PER_STEP.items():
                if key in episode:
                    demo.create_dataset(name, data=episode[key])
            nxt = np.minimum(np.arange(1, len(episode["action"]) + 1), len(episode["action"]) - 1)
            for key in obs_keys:
                demo.create_dataset(f"obs/{key}", data=episode[key])
                demo.create_dataset(f"next_obs/{key}", data=episode[key][nxt])
        for name, episodes in (masks or {}).items():
            f.create_dataset(f"mask/{name}", data=np.array([f"demo_{int(i)}" for i in episodes], dtype="S"))
    return path
