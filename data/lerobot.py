"""LeRobotDataset v3 import and export without the ``lerobot`` package.

Layout (``lerobot.datasets.utils``, ``CODEBASE_VERSION = "v3.0"``; Hugging Face blog "LeRobotDataset:v3.0")::

    meta/info.json                      codebase_version, fps, features {name: {dtype, shape, names[, info]}},
                                        data_path / video_path templates, total_episodes / total_frames / total_tasks
    meta/stats.json                     {feature: {min, max, mean, std, count}}; images per channel, shape (3, 1, 1),
                                        in [0, 1]
    meta/tasks.parquet                  task_index, indexed by the task string (a pandas index named "task")
    meta/episodes/chunk-XXX/file-XXX.parquet
                                        one row per episode: episode_index, tasks, length, dataset_from_index /
                                        dataset_to_index (global frame rows), data/chunk_index, data/file_index,
                                        videos/<key>/{chunk_index, file_index, from_timestamp, to_timestamp},
                                        meta/episodes/{chunk_index, file_index}, stats/<feature>/<stat>
    data/chunk-XXX/file-XXX.parquet     one row per frame: the numeric features, timestamp, frame_index,
                                        episode_index, index, task_index; several episodes per file
    videos/<key>/chunk-XXX/file-XXX.mp4 one camera, several episodes back to back; an episode's frame at
                                        ``timestamp`` is the video frame at ``from_timestamp + timestamp``

A feature of shape ``(1,)`` is a scalar Parquet column, a vector a fixed-size list (HF ``Value`` / ``Sequence``).
Imported arrays are ``[N, *shape]`` with the declared shape, so a per-step scalar comes back as ``[N, 1]``; images
come back as ``uint8 [N, H, W, 3]`` (video is lossy: numeric columns and episode boundaries round-trip exactly, pixels
within the codec's error). Video is encoded and decoded with the ffmpeg binary that ``imageio-ffmpeg`` ships.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data.io import atomic_directory
from data.replay_buffer import ReplayBuffer

CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
# Columns every LeRobot frame carries (lerobot.datasets.utils.DEFAULT_FEATURES); they are bookkeeping, not data.
DEFAULT_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
# LeRobot's default encoder settings (lerobot.datasets.video_utils.encode_video_frames): AV1, a keyframe every
# 2 frames so random access decodes at most one extra frame, CRF 30.
VCODECS = {"libsvtav1": "av1", "libx264": "h264"}
STATE_KEYS = ("state", "agent_pos")  # our names for the proprioceptive vector LeRobot calls observation.state
# Per-step outcomes: LeRobot's next.* features hold what followed the frame's action, as robomimic's rewards/dones do.
OUTCOME_KEYS = ("reward", "done", "success")
_MB = 1024**2


# -- key mapping ---------------------------------------------------------------------------------------------------
def is_image(arr: np.ndarray) -> bool:
    """``[N, H, W, 3]`` or ``[N, 3, H, W]``: an RGB camera stream."""
    return arr.ndim == 4 and (arr.shape[-1] == 3 or arr.shape[1] == 3)


def default_feature_names(buffer: ReplayBuffer, image_keys: Iterable[str], task_key: str) -> dict[str, str]:
    """Our buffer key -> LeRobot feature: ``action`` stays, ``state`` (else ``agent_pos``) is ``observation.state``,
    cameras are ``observation.images.<key>``, ``reward``/``done``/``success`` are ``next.<key>``, anything else
    ``observation.<key>``; ``task_key`` becomes the ``task_index`` column."""
    image_keys = set(image_keys)
    state = next((k for k in STATE_KEYS if k in buffer.data and k not in image_keys), None)
    names = {}
    for key in buffer.data:
        if key == task_key:
            continue
        if key == "action" or key.startswith(("observation.", "next.")):
            names[key] = key
        elif key == state:
            names[key] = "observation.state"
        elif key in image_keys:
            names[key] = f"observation.images.{key}"
        elif key in OUTCOME_KEYS:
            names[key] = f"next.{key}"
        else:
            names[key] = f"observation.{key}"
    return names


def default_buffer_key(feature: str) -> str:
    """Inverse of :func:`default_feature_names`: ``observation.state`` -> ``state``, ``observation.images.top`` ->
    ``top``, ``observation.image`` -> ``image``, ``next.reward`` -> ``reward``, other names (``action``) unchanged."""
    if feature == "observation.state":
        return "state"
    for prefix in ("observation.images.", "observation.", "next."):
        if feature.startswith(prefix):
            return feature[len(prefix) :]
    return feature


# -- statistics (lerobot.datasets.compute_stats.get_feature_stats) --------------------------------------------------
def feature_stats(values: np.ndarray, image: bool) -> dict[str, np.ndarray]:
    """min/max/mean/std over frames (per dimension; images per channel as ``(3, 1, 1)`` in [0, 1]) and count."""
    if image:  # uint8 [N, H, W, 3]: exact per-channel moments from 256-bin histograms (fast, no float copy)
        hist = np.stack([np.bincount(values[..., c].ravel(), minlength=256) for c in range(3)]).astype(np.float64)
        levels = np.arange(256) / 255.0
        total = hist.sum(axis=1)
        mean = hist @ levels / total
        std = np.sqrt(np.maximum(hist @ levels**2 / total - mean**2, 0.0))
        seen = hist > 0
        lo, hi = levels[seen.argmax(axis=1)], levels[255 - seen[:, ::-1].argmax(axis=1)]
        stats = {k: v.reshape(3, 1, 1) for k, v in {"min": lo, "max": hi, "mean": mean, "std": std}.items()}
    else:
        x = values.astype(np.float64)
        stats = {"min": x.min(axis=0), "max": x.max(axis=0), "mean": x.mean(axis=0), "std": x.std(axis=0)}
    stats["count"] = np.array([len(values)])
    return stats


def _jsonable(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    return {k: {s: np.asarray(v).tolist() for s, v in st.items()} for k, st in stats.items()}


# -- parquet helpers ------------------------------------------------------------------------------------------------
def _column(values: np.ndarray, shape: Sequence[int]) -> Any:
    """``[N, *shape]`` numpy -> an Arrow column (scalar for shape (1,), nested fixed-size lists otherwise)."""
    import pyarrow as pa

    arr = pa.array(np.ascontiguousarray(values).reshape(-1))
    for n in reversed(list(shape) if list(shape) != [1] else []):
        arr = pa.FixedSizeListArray.from_arrays(arr, n)
    return arr


def column_to_numpy(column: Any, shape: Sequence[int], dtype: str, name: str, where: str) -> np.ndarray:
    """An Arrow column (scalar, list or fixed-size list, possibly nested) -> ``[N, *shape]``; a shape that does not
    match the declaration is a ValueError naming both."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    while pa.types.is_list(arr.type) or pa.types.is_fixed_size_list(arr.type) or pa.types.is_large_list(arr.type):
        arr = arr.flatten()
    values = arr.to_numpy(zero_copy_only=False)
    per_step = math.prod(shape)
    if len(values) != n * per_step:
        found = len(values) / n if n else 0
        raise ValueError(
            f"feature '{name}': meta/info.json declares shape {list(shape)} ({per_step} values per frame) but {where} "
            f"holds {found:g} values per frame"
        )
    return values.astype(np.dtype(dtype), copy=False).reshape(n, *shape)


def _write_parquet(columns: Mapping[str, Any], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(dict(columns)), path)


def _write_tasks(tasks: Sequence[str], path: Path) -> None:
    """``meta/tasks.parquet`` as ``pd.DataFrame({"task_index": ...}, index=pd.Index(tasks, name="task"))`` writes it:
    the pandas metadata marks ``task`` as the index, so LeRobot's ``pd.read_parquet`` gets the same frame."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [
            {"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object", "metadata": None}
        ],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3",
    }  # fmt: skip
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(list(tasks))})
    table = table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _file_groups(sizes_mb: Sequence[float], limit_mb: float) -> list[list[int]]:
    """Consecutive episodes share a file until adding the next would reach ``limit_mb`` (LeRobot's rule)."""
    groups: list[list[int]] = [[]]
    size = 0.0
    for e, mb in enumerate(sizes_mb):
        if groups[-1] and size + mb >= limit_mb:
            groups.append([])
            size = 0.0
        groups[-1].append(e)
        size += mb
    return groups


def _chunk_file(i: int, chunks_size: int) -> tuple[int, int]:
    """The i-th file's (chunk_index, file_index): ``chunks_size`` files per chunk directory
    (lerobot.datasets.utils.update_chunk_file_indices)."""
    return divmod(i, chunks_size)


# -- video ----------------------------------------------------------------------------------------------------------
def _ffmpeg(args: list[str], stdin: bytes | None = None, what: str = "") -> None:
    import imageio_ffmpeg

    # SVT-AV1 prints its configuration banner unless told otherwise (SVT_LOG=1: errors only).
    proc = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args],
        input=stdin,
        capture_output=True,
        env={**os.environ, "SVT_LOG": "1"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed {what}: {proc.stderr.decode(errors='replace').strip()}")


def encode_video(frames: np.ndarray, path: Path, fps: int, vcodec: str, crf: int) -> None:
    """``uint8 [T, H, W, 3]`` -> one MP4 (yuv420p, a keyframe every 2 frames as LeRobot encodes)."""
    t, h, w, _ = frames.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    args = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "-"]
    args += ["-c:v", vcodec, "-pix_fmt", "yuv420p", "-g", "2", "-crf", str(crf)]
    if vcodec == "libsvtav1":
        args += ["-preset", "11"]  # SVT-AV1's fastest non-realtime preset (LeRobot asks for 12, which maps to 11)
    _ffmpeg([*args, str(path)], np.ascontiguousarray(frames).tobytes(), f"encoding {path}")


def concat_videos(parts: Sequence[Path], path: Path) -> None:
    """Episode MP4s -> one MP4, streams copied (ffmpeg's concat demuxer, as lerobot's concatenate_video_files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(parts) == 1:
        os.replace(parts[0], path)
        return
    listing = path.with_suffix(".txt")
    listing.write_text("".join(f"file '{p.resolve()}'\n" for p in parts))
    _ffmpeg(["-f", "concat", "-safe", "0", "-i", str(listing), "-c", "copy", str(path)], what=f"writing {path}")
    listing.unlink()
    for p in parts:
        p.unlink()


def decode_video(path: Path, height: int, width: int, name: str) -> np.ndarray:
    """All frames of an MP4 as ``uint8 [T, H, W, 3]``; a frame size other than the declared one is a ValueError."""
    import imageio_ffmpeg

    if not path.is_file():
        raise ValueError(f"feature '{name}': video file {path} is missing")
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    w, h = meta["size"]
    if (h, w) != (height, width):
        reader.close()
        raise ValueError(
            f"feature '{name}': meta/info.json declares frames of {height}x{width} (height x width) but {path} holds "
            f"{h}x{w}"
        )
    frames = [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in reader]
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)


# -- export ---------------------------------------------------------------------------------------------------------
def _image_frames(arr: np.ndarray) -> np.ndarray:
    """``[N, H, W, 3]`` or ``[N, 3, H, W]``, uint8 or float (0..1 or 0..255) -> ``uint8 [N, H, W, 3]``."""
    if arr.shape[-1] != 3:
        arr = np.moveaxis(arr, 1, -1)
    if arr.dtype == np.uint8:
        return arr
    scale = 255.0 if arr.size and float(np.max(arr)) <= 1.0 else 1.0
    return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)


def _task_names(
    buffer: ReplayBuffer, task: str | Sequence[str] | None, task_key: str, default: str
) -> tuple[list[str], np.ndarray]:
    """(task strings, per-step task_index [N])."""
    if task_key in buffer.data:
        index = np.asarray(buffer.data[task_key]).reshape(buffer.n_steps).astype(np.int64)
        n = int(index.max()) + 1 if len(index) else 0
        if task is None:
            names = [f"task_{i}" for i in range(n)]
        elif isinstance(task, str):
            if n > 1:
                raise ValueError(f"task: the buffer holds {n} tasks (data/{task_key}); give one name per task")
            names = [task]
        else:
            names = list(task)
        if len(names) < n:
            raise ValueError(f"task: {len(names)} names for {n} task indices in data/{task_key}")
        return names, index
    if task is not None and not isinstance(task, str):
        raise ValueError(f"task: a list of names needs a data/{task_key} key in the buffer; got {list(task)}")
    return [task if task is not None else default], np.zeros(buffer.n_steps, np.int64)


def write_lerobot(
    buffer: ReplayBuffer,
    path: str | os.PathLike,
    *,
    fps: int,
    task: str | Sequence[str] | None = None,
    task_key: str = "task_index",
    key_map: Mapping[str, str] | None = None,
    image_keys: Sequence[str] | None = None,
    vcodec: str = "libsvtav1",
    crf: int = 30,
    robot_type: str | None = None,
    data_files_size_in_mb: float = 100,
    video_files_size_in_mb: float = 500,
    chunks_size: int = 1000,
    progress: bool = False,
) -> Path:
    """Write ``buffer`` as a LeRobotDataset v3 directory at ``path`` (atomically: all or nothing).

    ``fps``: the control rate (the zarr store does not record it). ``task``: one task string for every episode, or
    names for the per-step task ids in the buffer key ``task_key`` (default names: the directory name, or
    ``task_<id>``). ``key_map``: buffer key ->
    feature name, overriding :func:`default_feature_names`; keys mapped to ``""`` are left out. ``image_keys``:
    the camera keys written as MP4 (default: every ``[N, H, W, 3]`` / ``[N, 3, H, W]`` array).
    """
    from tqdm import tqdm

    if isinstance(fps, float) and fps.is_integer():
        fps = int(fps)
    if not isinstance(fps, int) or isinstance(fps, bool) or fps <= 0:
        raise ValueError(f"fps must be a positive integer (LeRobot stores an integer frame rate), got {fps!r}")
    if vcodec not in VCODECS:
        raise ValueError(f"vcodec must be one of {sorted(VCODECS)}, got {vcodec!r}")
    if not 0 <= crf <= 63:
        raise ValueError(f"crf must be in [0, 63], got {crf}")
    if buffer.n_episodes == 0:
        raise ValueError("cannot export an empty replay buffer (no episodes)")
    for name, value in (
        ("data_files_size_in_mb", data_files_size_in_mb),
        ("video_files_size_in_mb", video_files_size_in_mb),
        ("chunks_size", chunks_size),
    ):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    path = Path(path)
    image_keys = [k for k in buffer.data if is_image(buffer.data[k])] if image_keys is None else list(image_keys)
    for key in image_keys:
        if key not in buffer.data or not is_image(buffer.data[key]):
            shape = buffer.data[key].shape if key in buffer.data else None
            raise ValueError(f"image key '{key}': expected an [N, H, W, 3] or [N, 3, H, W] array, got shape {shape}")
    names = default_feature_names(buffer, image_keys, task_key)
    for key, name in (key_map or {}).items():
        if key not in buffer.data:
            raise ValueError(f"key_map: no buffer key '{key}'; keys: {sorted(buffer.data)}")
        names[key] = name
    names = {k: v for k, v in names.items() if v}
    taken = [n for n in names.values() if n in DEFAULT_FEATURES]
    if taken or len(set(names.values())) != len(names):
        raise ValueError(f"feature names must be unique and not one of {list(DEFAULT_FEATURES)}, got {names}")
    bad = [n for n in names.values() if "/" in n]
    if bad:
        raise ValueError(f"feature names must not contain '/' (LeRobot's rule), got {bad}")

    frames = {k: _image_frames(buffer.data[k]) for k in names if k in image_keys}
    for key, f in frames.items():
        if f.shape[1] % 2 or f.shape[2] % 2:
            raise ValueError(f"image key '{key}': yuv420p video needs even height and width, got {f.shape[1:3]}")
    numeric = {
        k: np.asarray(buffer.data[k]).reshape(buffer.n_steps, *(buffer.data[k].shape[1:] or (1,)))
        for k in names
        if k not in image_keys
    }
    tasks, task_index = _task_names(buffer, task, task_key, path.name)

    features: dict[str, dict] = {}
    for key, arr in numeric.items():
        features[names[key]] = {"dtype": str(arr.dtype), "shape": list(arr.shape[1:]), "names": None}
    for key, f in frames.items():
        h, w = f.shape[1:3]
        features[names[key]] = {
            "dtype": "video",
            "shape": [h, w, 3],
            "names": ["height", "width", "channels"],
            "info": {
                "video.height": h,
                "video.width": w,
                "video.codec": VCODECS[vcodec],
                "video.pix_fmt": "yuv420p",
                "video.is_depth_map": False,
                "video.fps": fps,
                "video.channels": 3,
                "has_audio": False,
            },
        }
    features.update(DEFAULT_FEATURES)

    lengths = buffer.episode_lengths
    starts = np.concatenate([[0], buffer.episode_ends[:-1]]).astype(np.int64)
    frame_index = np.concatenate([np.arange(n) for n in lengths]).astype(np.int64)
    episode_index = np.repeat(np.arange(buffer.n_episodes), lengths).astype(np.int64)
    bookkeeping = {
        "timestamp": (frame_index / fps).astype(np.float32),
        "frame_index": frame_index,
        "episode_index": episode_index,
        "index": np.arange(buffer.n_steps, dtype=np.int64),
        "task_index": task_index,
    }
    row_bytes = sum(v[0].nbytes for v in numeric.values()) + sum(v[0].nbytes for v in bookkeeping.values())

    values = {names[k]: v for k, v in numeric.items()} | {names[k]: v for k, v in frames.items()} | bookkeeping
    image_features = {names[k] for k in frames}
    rows: list[dict[str, Any]] = []
    for e in range(buffer.n_episodes):
        s = slice(int(starts[e]), int(starts[e] + lengths[e]))
        rows.append({
            "episode_index": e,
            "tasks": sorted({tasks[i] for i in task_index[s]}),
            "length": int(lengths[e]),
            "dataset_from_index": s.start,
            "dataset_to_index": s.stop,
            "meta/episodes/chunk_index": 0,
            "meta/episodes/file_index": 0,
        })  # fmt: skip

    with atomic_directory(path) as root:
        # Frames: consecutive episodes share a Parquet file up to data_files_size_in_mb.
        for i, group in enumerate(_file_groups(lengths * row_bytes / _MB, data_files_size_in_mb)):
            chunk, file = _chunk_file(i, chunks_size)
            s = slice(int(starts[group[0]]), int(starts[group[-1]] + lengths[group[-1]]))
            cols = {names[k]: _column(v[s], v.shape[1:]) for k, v in numeric.items()}
            cols |= {k: _column(v[s], [1]) for k, v in bookkeeping.items()}
            _write_parquet(cols, root / DATA_PATH.format(chunk_index=chunk, file_index=file))
            for e in group:
                rows[e] |= {"data/chunk_index": chunk, "data/file_index": file}

        # Videos: each episode is encoded alone, then consecutive episodes are joined (stream copy) into one MP4 per
        # camera up to video_files_size_in_mb; an episode's frames start at from_timestamp in its file.
        scratch = root / ".episodes"
        for key, f in frames.items():
            name = names[key]
            parts = [scratch / name / f"{e:06d}.mp4" for e in range(buffer.n_episodes)]
            for e in tqdm(range(buffer.n_episodes), desc=f"encode {name}", disable=not progress, unit="episode"):
                encode_video(f[starts[e] : starts[e] + lengths[e]], parts[e], fps, vcodec, crf)
            sizes = [p.stat().st_size / _MB for p in parts]
            for i, group in enumerate(_file_groups(sizes, video_files_size_in_mb)):
                chunk, file = _chunk_file(i, chunks_size)
                concat_videos([parts[e] for e in group], root / VIDEO_PATH.format(video_key=name, chunk_index=chunk,
                                                                                  file_index=file))  # fmt: skip
                from_s = 0.0
                for e in group:
                    rows[e] |= {
                        f"videos/{name}/chunk_index": chunk,
                        f"videos/{name}/file_index": file,
                        f"videos/{name}/from_timestamp": from_s,
                        f"videos/{name}/to_timestamp": from_s + lengths[e] / fps,
                    }
                    from_s += lengths[e] / fps
            (scratch / name).rmdir()
        if scratch.exists():
            scratch.rmdir()

        # Per-episode stats (what LeRobot aggregates into stats.json) close each episode's row.
        for row in rows:
            s = slice(row["dataset_from_index"], row["dataset_to_index"])
            for feat, v in values.items():
                for stat, x in feature_stats(v[s], feat in image_features).items():
                    row[f"stats/{feat}/{stat}"] = x.tolist()
        _write_parquet(
            {c: [r[c] for r in rows] for c in rows[0]}, root / EPISODES_PATH.format(chunk_index=0, file_index=0)
        )
        _write_tasks(tasks, root / "meta" / "tasks.parquet")
        stats = {feat: feature_stats(v, feat in image_features) for feat, v in values.items()}
        (root / "meta" / "stats.json").write_text(json.dumps(_jsonable(stats), indent=4))
        info = {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": robot_type,
            "total_episodes": buffer.n_episodes,
            "total_frames": buffer.n_steps,
            "total_tasks": len(tasks),
            "chunks_size": chunks_size,
            "data_files_size_in_mb": data_files_size_in_mb,
            "video_files_size_in_mb": video_files_size_in_mb,
            "fps": fps,
            "splits": {"train": f"0:{buffer.n_episodes}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if frames else None,
            "features": features,
        }
        (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    return path


# -- import ---------------------------------------------------------------------------------------------------------
def load_info(path: str | os.PathLike) -> dict:
    """``meta/info.json`` of a LeRobot v3 directory, checked: a missing or corrupt file, a missing field, another
    codebase version or a malformed feature is a ValueError saying what was expected."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no LeRobot dataset directory at {path}")
    file = path / "meta" / "info.json"
    if not file.is_file():
        raise ValueError(f"{path} is not a LeRobot v3 dataset: {file} is missing (expected meta/info.json)")
    try:
        info = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err}); expected LeRobot v3 metadata") from err
    if not isinstance(info, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(info).__name__}")
    required = ("codebase_version", "fps", "features", "data_path", "total_episodes", "total_frames")
    missing = [k for k in required if k not in info]
    if missing:
        raise ValueError(f"{file} lacks {missing}; a LeRobot v3 info.json has {list(required)}")
    version = str(info["codebase_version"])
    if not version.startswith("v3."):
        raise ValueError(
            f"{file}: codebase_version is {version!r}, expected 'v3.x' (convert older datasets with lerobot's "
            "convert_dataset_v21_to_v30)"
        )
    if not isinstance(info["features"], dict) or not info["features"]:
        raise ValueError(f"{file}: 'features' must be a non-empty object of {{name: {{dtype, shape, names}}}}")
    for name, ft in info["features"].items():
        if not isinstance(ft, dict) or "dtype" not in ft or "shape" not in ft:
            raise ValueError(f"{file}: feature '{name}' needs 'dtype' and 'shape', got {ft}")
        shape = ft["shape"]
        if not isinstance(shape, list) or not shape or not all(isinstance(n, int) and n > 0 for n in shape):
            raise ValueError(f"{file}: feature '{name}' has shape {shape}, expected a list of positive integers")
        if ft["dtype"] in ("video", "image") and (len(shape) != 3 or 3 not in (shape[0], shape[-1])):
            raise ValueError(f"{file}: feature '{name}' is a camera with shape {shape}, expected [H, W, 3]")
    if any(ft["dtype"] == "video" for ft in info["features"].values()) and not info.get("video_path"):
        raise ValueError(f"{file}: video features need a 'video_path' template")
    return info


def read_parquet(path: Path) -> Any:
    """One Parquet file as an Arrow table; a missing file is a ValueError naming it."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise ValueError(f"{path} is missing")
    return pq.read_table(path)


def read_episodes(path: str | os.PathLike) -> list[dict]:
    """Rows of ``meta/episodes/*/*.parquet`` (without the per-episode stats), sorted by ``episode_index``."""
    import pyarrow as pa

    files = sorted(Path(path).glob("meta/episodes/chunk-*/file-*.parquet"))
    if not files:
        raise ValueError(f"{path}: no episode metadata (expected meta/episodes/chunk-000/file-000.parquet)")
    tables = [read_parquet(f) for f in files]
    table = pa.concat_tables(
        [t.select([c for c in t.column_names if not c.startswith("stats/")]) for t in tables], promote_options="default"
    )
    rows = table.to_pylist()
    for key in ("episode_index", "length", "dataset_from_index", "dataset_to_index"):
        if key not in table.column_names:
            raise ValueError(f"{path}: episode metadata lacks the column '{key}'")
    return sorted(rows, key=lambda r: r["episode_index"])


def read_tasks(path: str | os.PathLike) -> list[str]:
    """Task strings by ``task_index`` from ``meta/tasks.parquet`` (the pandas index column ``task``, or
    ``__index_level_0__`` as older writers named it)."""
    table = read_parquet(Path(path) / "meta" / "tasks.parquet")
    column = next((c for c in ("task", "__index_level_0__") if c in table.column_names), None)
    if column is None or "task_index" not in table.column_names:
        raise ValueError(
            f"{path}/meta/tasks.parquet: expected columns 'task' and 'task_index', got {table.column_names}"
        )
    by_index = dict(zip(table["task_index"].to_pylist(), table[column].to_pylist(), strict=True))
    return [by_index[i] for i in sorted(by_index)]


def read_frames(path: Path, info: dict, episodes: Sequence[dict], columns: Sequence[str]) -> Any:
    """The ``index`` column and ``columns`` of every data file the episodes point to, as one Arrow table in global
    ``index`` order; checked against ``total_frames`` and for an ``index`` running 0..N-1."""
    import pyarrow as pa

    columns = ["index", *[c for c in columns if c != "index"]]
    files = sorted({(int(r.get("data/chunk_index", 0)), int(r.get("data/file_index", 0))) for r in episodes})
    tables = []
    for c, f in files:
        file = path / info["data_path"].format(chunk_index=c, file_index=f)
        table = read_parquet(file)
        absent = [col for col in columns if col not in table.column_names]
        if absent:
            raise ValueError(f"{file} lacks the columns {absent} that meta/info.json declares")
        tables.append(table.select(columns))
    table = pa.concat_tables(tables).sort_by("index")
    n = len(table)
    if n != info["total_frames"]:
        raise ValueError(f"{path}: info.json says {info['total_frames']} frames, the data files hold {n}")
    if not np.array_equal(table["index"].to_numpy(), np.arange(n)):
        raise ValueError(f"{path}: the 'index' column must run 0..{n - 1} over the data files")
    return table


def is_readable(dtype: str) -> bool:
    """Video, or a numeric/bool numpy dtype (not LeRobot's PNG ``image`` or ``string`` features)."""
    if dtype == "video":
        return True
    try:
        return np.dtype(dtype).kind in "biuf"
    except TypeError:
        return False


def read_lerobot(
    path: str | os.PathLike,
    *,
    key_map: Mapping[str, str] | None = None,
    features: Sequence[str] | None = None,
    task_key: str = "task_index",
    progress: bool = False,
) -> ReplayBuffer:
    """A LeRobot v3 directory -> :class:`ReplayBuffer` with one buffer key per feature.

    ``features``: the LeRobot features to read (default: all but the bookkeeping columns). ``key_map``: feature name
    -> buffer key, overriding :func:`default_buffer_key`. Datasets with several tasks also get the per-step task
    ids ``[N]`` under ``task_key``.
    """
    from tqdm import tqdm

    path = Path(path)
    info = load_info(path)
    declared = info["features"]
    readable = [f for f, ft in declared.items() if f not in DEFAULT_FEATURES and is_readable(ft["dtype"])]
    wanted = readable if features is None else list(features)
    unknown = [f for f in wanted if f not in declared]
    if unknown:
        raise ValueError(f"{path}: no feature {unknown}; features: {sorted(declared)}")
    unreadable = [f for f in wanted if not is_readable(declared[f]["dtype"])]
    if unreadable:
        raise ValueError(
            f"{path}: features {unreadable} have dtype {[declared[f]['dtype'] for f in unreadable]}; only numeric "
            "and video features are read (PNG 'image' and 'string' features are not)"
        )
    keys = {f: (key_map or {}).get(f, default_buffer_key(f)) for f in wanted}
    if len(set(keys.values())) != len(keys):
        raise ValueError(f"features map to clashing buffer keys {keys}; pass key_map to rename")

    episodes = read_episodes(path)
    if [r["episode_index"] for r in episodes] != list(range(len(episodes))):
        raise ValueError(f"{path}: episode_index in meta/episodes must run 0..{len(episodes) - 1}")
    if len(episodes) != info["total_episodes"]:
        raise ValueError(f"{path}: info.json says {info['total_episodes']} episodes, meta/episodes has {len(episodes)}")

    numeric = [f for f in wanted if declared[f]["dtype"] != "video"]
    table = read_frames(path, info, episodes, ["episode_index", "timestamp", "task_index", *numeric])
    ends, frame_ep = [], table["episode_index"].to_numpy()
    for r in episodes:
        lo, hi = int(r["dataset_from_index"]), int(r["dataset_to_index"])
        if (
            lo != (ends[-1] if ends else 0)
            or hi - lo != int(r["length"])
            or np.any(frame_ep[lo:hi] != r["episode_index"])
        ):
            raise ValueError(
                f"{path}: episode {r['episode_index']} claims rows [{lo}, {hi}) with length {r['length']}, which does "
                "not match the data files' episode_index column"
            )
        ends.append(hi)

    data = {
        keys[f]: column_to_numpy(table[f], declared[f]["shape"], declared[f]["dtype"], f, f"{path}/data")
        for f in numeric
    }
    if int(info.get("total_tasks") or len(read_tasks(path))) > 1:
        data[task_key] = table["task_index"].to_numpy().astype(np.int64)

    # Video: decode each MP4 once; frame t of an episode is the video frame at from_timestamp + timestamp.
    timestamps = table["timestamp"].to_numpy().astype(np.float64)
    for f in (f for f in wanted if declared[f]["dtype"] == "video"):
        fps = float((declared[f].get("info") or {}).get("video.fps", info["fps"]))
        shape = declared[f]["shape"]
        h, w = (shape[0], shape[1]) if shape[-1] == 3 else (shape[1], shape[2])
        out = np.empty((len(table), h, w, 3), np.uint8)
        by_file: dict[tuple[int, int], list[dict]] = {}
        for r in episodes:
            if f"videos/{f}/from_timestamp" not in r:
                raise ValueError(
                    f"{path}: episode metadata lacks videos/{f}/from_timestamp for episode {r['episode_index']}"
                )
            by_file.setdefault((int(r[f"videos/{f}/chunk_index"]), int(r[f"videos/{f}/file_index"])), []).append(r)
        for (c, fi), rows in tqdm(by_file.items(), desc=f"decode {f}", disable=not progress, unit="file"):
            file = path / info["video_path"].format(video_key=f, chunk_index=c, file_index=fi)
            video = decode_video(file, h, w, f)
            for r in rows:
                lo, hi = int(r["dataset_from_index"]), int(r["dataset_to_index"])
                idx = np.rint((float(r[f"videos/{f}/from_timestamp"]) + timestamps[lo:hi]) * fps).astype(np.int64)
                if len(idx) and (idx.min() < 0 or idx.max() >= len(video)):
                    raise ValueError(
                        f"{file} has {len(video)} frames; episode {r['episode_index']} needs frames "
                        f"{idx.min()}..{idx.max()}"
                    )
                out[lo:hi] = video[idx]
        data[keys[f]] = out
    return ReplayBuffer(data, ends)
