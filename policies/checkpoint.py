"""Checkpoints: a directory with ``model.safetensors`` and ``config.json``; nothing pickled.

``config.json`` holds the policy type, its resolved config and the observation/action shapes, plus whatever
the caller adds (task, training config), so a policy is rebuilt from the directory alone. Writes are atomic.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data.io import atomic_directory
from policies.base import Policy
from policies.registry import config_from_dict, make_policy

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def policy_state(policy: Policy) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; clone so tied views are saved independently.
    return {k: v.detach().cpu().contiguous().clone() for k, v in policy.state_dict().items()}


def checkpoint_config(policy: Policy, extra: Mapping[str, Any] | None = None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "policy_type": policy.config.type,
        "policy": dataclasses.asdict(policy.config),
        "shape_meta": policy.shape_meta,
        **(dict(extra) if extra else {}),
    }


def save_checkpoint(
    policy: Policy,
    directory: str | Path,
    extra_config: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write ``directory`` atomically; ``extra_files`` (name -> bytes) are written beside the model."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        save_file(policy_state(policy), str(tmp / MODEL_FILE), metadata={"policy_type": policy.config.type})
        (tmp / CONFIG_FILE).write_text(json.dumps(checkpoint_config(policy, extra_config), indent=2))
        for name, blob in (extra_files or {}).items():
            (tmp / name).write_bytes(blob)
    return directory


def read_config(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a checkpoint: no {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the checkpoint is damaged") from err
    for key in ("policy_type", "policy", "shape_meta"):
        if key not in config:
            raise ValueError(f"{path} lacks '{key}'; the checkpoint is damaged or from another tool")
    return config


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"missing {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {path} ({err}); the file is truncated or damaged") from err


def load_policy(directory: str | Path, device: str | torch.device = "cpu", **overrides: Any) -> Policy:
    """Rebuild a policy from a checkpoint directory. ``overrides`` replace config fields (e.g. sampler)."""
    config = read_config(directory)
    policy_config = config_from_dict(config["policy_type"], {**config["policy"], **overrides})
    policy = make_policy(policy_config, config["shape_meta"])
    state = load_state(Path(directory) / MODEL_FILE)
    missing, unexpected = policy.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{directory}/{MODEL_FILE} does not match policy '{config['policy_type']}': "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return policy.to(device).eval()
