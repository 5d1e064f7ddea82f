"""Action sources: a checkpoint turned into something that acts one robot step at a time (batch 1).

``load_action_source(checkpoint, executor, **overrides)`` rebuilds the policy through the registry
(``policies.checkpoint.load_policy``; no training code) and wraps it in the one chunk-execution owner,
``envs.executor.make_executor``. Overrides are checked against the checkpoint: names of the saved policy config
(inference fields such as ``sampler`` or ``num_inference_steps``; a checkpoint holds no optimiser fields) go to the
policy, every other name is an executor option that ``make_executor`` validates (``temporal_ensemble``, RTI's
``rti_steps`` ...). Observations come without a batch dimension (``{"state": [20]}``), actions go out as ``[Da]``.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs import executor as executors
from policies.base import Policy
from policies.checkpoint import load_policy, read_config
from policies.onnx_backend import check_backend, use_onnx

# make_executor's own arguments, filled here from the policy config; everything else it takes is an option.
EXECUTOR_ARGUMENTS = ("kind", "policy", "n_obs_steps", "n_action_steps", "device")


class ObsWindow:
    """The last ``n_obs_steps`` observations ``{key: [To, ...]}``; the first observation of an episode is repeated to
    fill the window, the same padding rule as ``envs.executor.ChunkExecutor`` (Diffusion Policy's MultiStepWrapper)."""

    def __init__(self, n_obs_steps: int) -> None:
        executors.check_int("n_obs_steps", n_obs_steps, 1)
        self.n_obs_steps = n_obs_steps
        self.frames: dict[str, deque[np.ndarray]] = {}

    def clear(self) -> None:
        self.frames = {}

    def push(self, obs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Add the newest observation ``{key: [...]}``; returns the window ``{key: [To, ...]}``, oldest first."""
        if self.frames and set(obs) != set(self.frames):
            raise ValueError(f"obs keys must stay {sorted(self.frames)} within an episode, got {sorted(obs)}")
        for key, value in obs.items():
            value = np.array(value)  # copy: robots may reuse their buffers
            if key in self.frames:
                self.frames[key].append(value)
            else:
                self.frames[key] = deque([value] * self.n_obs_steps, maxlen=self.n_obs_steps)
        return self.window()

    def window(self) -> dict[str, np.ndarray]:
        """The current window ``{key: [To, ...]}``, oldest first."""
        if not self.frames:
            raise ValueError("the observation window is empty: push an observation first")
        return {key: np.stack(frames) for key, frames in self.frames.items()}


class ActionSource:
    """A policy plus its executor for one robot. ``act(obs) -> [Da]`` is one control step (synchronous use);
    ``chunk(obs_window) -> [H - To + 1, Da]`` is one full prediction from the current observation on (asynchronous
    use: the caller timestamps it)."""

    def __init__(self, policy: Policy, runner: executors.ChunkExecutor, executor: str) -> None:
        self.policy = policy
        self.runner = runner  # the envs.executor object that owns history, queue and warm-start state
        self.executor = executor  # its kind, one of envs.executor.EXECUTORS
        self.action_dim = policy.action_dim
        self.n_obs_steps = runner.n_obs_steps
        self.n_action_steps = runner.n_action_steps
        self.horizon = policy.config.horizon
        self.obs_shapes = {key: tuple(shape) for key, shape in policy.shape_meta["obs"].items()}
        self.reset()

    def reset(self) -> None:
        """New episode: the executor forgets its history, queue and warm-start state."""
        self.runner.reset(batch_size=1)

    def act(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        """``obs {key: [...]}`` (newest observation, no batch dim) -> action ``[Da]`` in raw units."""
        self._check(obs, leading=())
        return self.runner.act({key: np.asarray(value)[None] for key, value in obs.items()})[0]

    def chunk(self, obs_window: Mapping[str, np.ndarray]) -> np.ndarray:
        """``obs_window {key: [To, ...]}`` -> ``chunk[0, To - 1:]`` ``[H - To + 1, Da]``: the action for the newest
        observation first (see deploy.types for the timestamps)."""
        self._check(obs_window, leading=(self.n_obs_steps,))
        obs = {
            key: torch.as_tensor(np.asarray(value)[None], dtype=torch.float32, device=self.runner.device)
            for key, value in obs_window.items()
        }  # key -> [1, To, ...]
        with torch.no_grad():
            chunk = self.policy.predict_action_chunk(obs)  # [1, H, Da]
        return chunk[0, self.n_obs_steps - 1 :].to("cpu", torch.float32).numpy()

    def _check(self, obs: Mapping[str, np.ndarray], leading: tuple[int, ...]) -> None:
        if set(obs) != set(self.obs_shapes):
            raise ValueError(f"observation keys must be {sorted(self.obs_shapes)}, got {sorted(obs)}")
        for key, shape in self.obs_shapes.items():
            got = np.shape(obs[key])
            if got != (*leading, *shape):
                raise ValueError(f"observation {key!r} has shape {list(got)}, expected {[*leading, *shape]}")


# Policy fields that define what the network was trained on: overriding one at load would silently disagree with the
# saved weights or normalizer (e.g. action_scale lives in the normalizer's buffers), so they are refused.
TRAINING_FIELDS = ("action_scale", "horizon", "n_obs_steps")


def executor_option_names() -> tuple[list[str], bool]:
    """The options ``make_executor`` names in its signature, and whether it takes more (``**options``, which it
    validates itself)."""
    params = inspect.signature(executors.make_executor).parameters.values()
    named = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY]
    return [n for n in named if n not in EXECUTOR_ARGUMENTS], any(p.kind is p.VAR_KEYWORD for p in params)


def load_action_source(
    checkpoint: str | Path, executor: str | None = None, device: str = "cpu", backend: str = "torch", **overrides: Any
) -> ActionSource:
    """Checkpoint directory -> ``ActionSource``. ``executor`` is one of ``envs.executor.EXECUTORS`` (None: the
    policy's ``default_executor`` or "chunk"); ``backend`` "onnx" runs the policy's UNet through ONNX Runtime
    (``policies.onnx_backend``); ``overrides`` are policy inference fields or executor options."""
    check_backend(backend)
    if executor is not None and executor not in executors.EXECUTORS:
        raise ValueError(f"executor must be one of {executors.EXECUTORS}, got {executor!r}")
    saved = read_config(checkpoint)
    policy_fields = sorted(saved["policy"])
    option_names, more_options = executor_option_names()
    accepted = f"policy fields {policy_fields} and executor options {option_names}"
    fixed = sorted(set(overrides) & set(TRAINING_FIELDS))
    if fixed:
        raise ValueError(
            f"{fixed} are set at training time and saved with the weights and normalizer of {checkpoint}; "
            f"they cannot be overridden at inference"
        )
    policy_overrides = {k: v for k, v in overrides.items() if k in saved["policy"]}
    options = {k: v for k, v in overrides.items() if k not in saved["policy"]}
    unknown = sorted(set(options) - set(option_names))
    if unknown and not more_options:
        raise ValueError(f"unknown overrides {unknown} for {checkpoint}; accepted: {accepted}")
    try:
        policy = load_policy(checkpoint, device=device, **policy_overrides)
    except (RuntimeError, ValueError) as err:
        if not policy_overrides:
            raise
        # e.g. a down_dims or n_obs_steps override no longer matches the saved weights
        raise ValueError(f"cannot load {checkpoint} with policy overrides {policy_overrides}: {err}") from err
    if backend == "onnx":
        use_onnx(policy)
    kind = executor if executor is not None else getattr(policy, "default_executor", "chunk")
    try:
        runner = executors.make_executor(
            kind, policy, policy.config.n_obs_steps, policy.config.n_action_steps, device=device, **options
        )
    except ValueError as err:
        raise ValueError(f"{err} (policy fields accepted as overrides: {policy_fields})") from err
    return ActionSource(policy, runner, kind)
