"""Action-chunk execution: the one owner of observation history, action queues and temporal ensembling.

Used identically by simulated evaluation, RL rollouts and the real-time loop. Policies are stateless
(`predict_action_chunk(obs: {key: [B, To, ...]}, noise=None) -> [B, H, Da]` in raw units); everything that
depends on time lives here. All B environments replan at the same step (lockstep).

Chunk alignment: `chunk[:, action_offset]` is the action for the current (latest) observation.
Diffusion Policy predicts a horizon starting at the oldest observation, so the default offset is
`n_obs_steps - 1` and the executed actions are `chunk[:, To-1 : To-1+Ta]`.

Executors (`make_executor(kind, ...)`): "chunk" (open loop, or ACT temporal ensembling with `temporal_ensemble`),
"ensemble" (temporal ensembling, k = 0.01 by default), "rti" (real-time iteration: warm-started refinement of the
previous chunk every `rti_every` steps) and "streaming" (Streaming Diffusion Policy's rolling buffer). Every kind
can snap `discrete_dims` of the executed action to the nearest of `snap_values` (e.g. a gripper's open/closed).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Protocol

import numpy as np
import torch


class ChunkPolicy(Protocol):
    def predict_action_chunk(self, obs: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor: ...


class RefinablePolicy(ChunkPolicy, Protocol):
    def refine_action_chunk(
        self,
        obs: dict[str, torch.Tensor],
        actions: torch.Tensor,
        num_steps: int,
        start: float,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


class CorrectedPolicy(ChunkPolicy, Protocol):
    """A chunk policy whose executed actions get a per-step correction from the observation of that step (residual
    RL, ``rl.adapters.ResidualPolicy``): the executor queues ``base_action_chunk`` and corrects each action when it
    is executed."""

    def base_action_chunk(self, obs: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor: ...

    def correct_action(self, obs: dict[str, torch.Tensor], action: torch.Tensor) -> torch.Tensor: ...


class StreamingPolicy(Protocol):
    def stream(
        self, obs: dict[str, torch.Tensor], buffer: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class ObsHistory:
    """The last ``n_obs_steps`` observations of B environments, ``{key: [B, To, ...]}``. The first observation of an
    episode is repeated to fill the window, as Diffusion Policy's MultiStepWrapper does, so the policy always sees
    To frames."""

    def __init__(self, n_obs_steps: int, batch_size: int) -> None:
        check_int("n_obs_steps", n_obs_steps, 1)
        check_int("batch_size", batch_size, 1)
        self.n_obs_steps, self.batch_size = n_obs_steps, batch_size
        self.frames: dict[str, deque[np.ndarray]] = {}  # key -> To arrays [B, ...], oldest first

    def push(self, obs: dict[str, np.ndarray]) -> None:
        """Append the latest observation ``{key: [B, ...]}`` (validated before any state changes)."""
        if not obs:
            raise ValueError("obs must be a non-empty dict of arrays [B, ...], got an empty dict")
        if self.frames and set(obs) != set(self.frames):
            raise ValueError(f"obs keys must stay {sorted(self.frames)} within an episode, got {sorted(obs)}")
        # Copy: vector envs may reuse their observation buffers between steps.
        obs = {key: np.array(value) for key, value in obs.items()}
        for key, value in obs.items():
            if value.ndim < 1 or value.shape[0] != self.batch_size:
                raise ValueError(f"obs[{key!r}] must have shape [B={self.batch_size}, ...], got shape {value.shape}")
        for key, value in obs.items():
            if key not in self.frames:
                self.frames[key] = deque([value] * self.n_obs_steps, maxlen=self.n_obs_steps)
            else:
                self.frames[key].append(value)

    def window(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """``{key: [B, To, ...]}`` tensors (int64 for int64 observations, else float32), oldest first."""
        if not self.frames:
            raise ValueError("the observation history is empty: push an observation first")
        windows = {key: np.stack(frames, axis=1) for key, frames in self.frames.items()}
        # integer keys (task ids for an embedding, e.g. MoDE's task token) stay int64, the rest becomes float32
        return {
            key: torch.as_tensor(w, dtype=torch.int64 if w.dtype == np.int64 else torch.float32, device=device)
            for key, w in windows.items()
        }


class ChunkExecutor:
    """Turns a chunk policy into a per-step controller for a batch of B environments.

    Without ensembling the policy is queried every `n_action_steps` steps and its actions
    `chunk[:, offset : offset + n_action_steps]` are executed in order.

    A policy with `correct_action(obs_window, action)` (a ``CorrectedPolicy``, e.g. a residual RL adapter) has its
    `base_action_chunk` queued instead, and every executed action is corrected with the observation window of the
    step that executes it (after ensembling, before snapping).

    With `temporal_ensemble=k` (ACT, Zhao et al. 2023, Sec. 3.3) the policy is queried every step; a
    chunk predicted at step s provides actions for steps s .. s + n_action_steps - 1, and the action executed
    at step t is the average of all such predictions for t, weighted exp(-k * i), i = 0 the oldest.
    """

    def __init__(
        self,
        policy: ChunkPolicy,
        n_obs_steps: int,
        n_action_steps: int,
        action_offset: int | None = None,
        temporal_ensemble: float | None = None,
        device: str | torch.device = "cpu",
        discrete_dims: list[int] | None = None,
        snap_values: list[float] | None = None,
    ) -> None:
        check_int("n_obs_steps", n_obs_steps, 1)
        check_int("n_action_steps", n_action_steps, 1)
        if action_offset is None:
            action_offset = n_obs_steps - 1
        check_int("action_offset", action_offset, 0)
        if temporal_ensemble is not None and (
            isinstance(temporal_ensemble, bool)
            or not isinstance(temporal_ensemble, (int, float))
            or not math.isfinite(temporal_ensemble)
            or temporal_ensemble < 0
        ):
            raise ValueError(f"temporal_ensemble must be a finite float >= 0 or None, got {temporal_ensemble!r}")
        self.policy = policy
        self.n_obs_steps = n_obs_steps
        self.n_action_steps = n_action_steps
        self.action_offset = action_offset
        self.temporal_ensemble = None if temporal_ensemble is None else float(temporal_ensemble)
        self.device = torch.device(device)
        self.discrete_dims, self.snap_values = _check_snapping(discrete_dims, snap_values)
        self.batch_size: int | None = None

    def reset(self, batch_size: int) -> None:
        """Forget history and queued actions; the next `act` starts new episodes for `batch_size` envs."""
        check_int("batch_size", batch_size, 1)
        self.batch_size = batch_size
        self._history = ObsHistory(self.n_obs_steps, batch_size)
        self._queue: deque[np.ndarray] = deque()  # [B, Da] actions for the coming steps
        self._chunks: deque[tuple[int, np.ndarray]] = deque()  # (step predicted, [B, Ta, Da]) for ensembling
        self._t = 0

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """One control step: `obs {key: [B, ...]}` (the latest observation) -> action [B, Da]."""
        if self.batch_size is None:
            raise RuntimeError("call reset(batch_size) before act()")
        self._append(obs)
        if self.temporal_ensemble is None:
            if not self._queue:
                self._queue.extend(self._predict().swapaxes(0, 1))  # Ta actions of shape [B, Da]
            action = self._queue.popleft()
        else:
            action = self._ensembled_action()
        self._t += 1
        return self._snap(self._correct(action))

    def _correct(self, action: np.ndarray) -> np.ndarray:
        """Per-step correction ``[B, Da] -> [B, Da]`` of a ``CorrectedPolicy``; other policies pass through."""
        correct = getattr(self.policy, "correct_action", None)
        if correct is None:
            return action
        with torch.no_grad():
            out = correct(self._obs_window(), torch.as_tensor(action, device=self.device))
        return out.detach().to("cpu", torch.float32).numpy()

    def _snap(self, action: np.ndarray) -> np.ndarray:
        """Discrete dimensions of ``action [B, Da]`` -> the nearest of ``snap_values`` (ties: the first listed)."""
        if not self.discrete_dims:
            return action
        if max(self.discrete_dims) >= action.shape[-1]:
            raise ValueError(f"discrete_dims {self.discrete_dims} must index action dims < {action.shape[-1]}")
        values = np.asarray(self.snap_values, dtype=action.dtype)
        part = action[:, self.discrete_dims]  # [B, n_discrete]
        nearest = np.abs(part[..., None] - values).argmin(-1)  # [B, n_discrete]
        action = action.copy()
        action[:, self.discrete_dims] = values[nearest]
        return action

    def _append(self, obs: dict[str, np.ndarray]) -> None:
        self._history.push(obs)

    def _obs_window(self) -> dict[str, torch.Tensor]:
        return self._history.window(self.device)

    def _query(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The policy's chunk ``[B, H, Da]`` for the observation window (a ``CorrectedPolicy``'s base chunk, which
        ``act`` corrects step by step)."""
        base_chunk = getattr(self.policy, "base_action_chunk", None)
        return base_chunk(obs) if base_chunk is not None else self.policy.predict_action_chunk(obs)

    def _predict(self) -> np.ndarray:
        """Query the policy on the history; returns the executable actions [B, Ta, Da]."""
        with torch.no_grad():
            chunk = self._query(self._obs_window())
        return self._checked(chunk)[:, self.action_offset : self.action_offset + self.n_action_steps]

    def _checked(self, chunk: torch.Tensor) -> np.ndarray:
        """The policy's chunk as numpy ``[B, H, Da]``, checked to cover the executed slice."""
        chunk = chunk.detach().to("cpu", torch.float32).numpy()
        end = self.action_offset + self.n_action_steps
        if chunk.ndim != 3 or chunk.shape[0] != self.batch_size or chunk.shape[1] < end:
            raise ValueError(
                f"policy chunk must have shape [B={self.batch_size}, H>={end}, Da] "
                f"(action_offset {self.action_offset} + n_action_steps {self.n_action_steps}), "
                f"got {chunk.shape}"
            )
        return chunk

    def _ensembled_action(self) -> np.ndarray:
        self._chunks.append((self._t, self._predict()))
        # A chunk predicted at step s covers steps s .. s + Ta - 1; drop the ones that no longer reach step t.
        while self._chunks[0][0] + self.n_action_steps <= self._t:
            self._chunks.popleft()
        preds = np.stack([chunk[:, self._t - s] for s, chunk in self._chunks])  # [N, B, Da], oldest first
        weights = np.exp(-self.temporal_ensemble * np.arange(len(preds)))  # ACT: w_i = exp(-k i), i=0 oldest
        return np.einsum("n,nbd->bd", weights / weights.sum(), preds).astype(preds.dtype)


class StreamingExecutor(ChunkExecutor):
    """Streaming Diffusion Policy's rolling buffer (``policies.streaming``): every ``n_action_steps`` steps the
    policy takes the latest observations and the buffer it returned last time, runs a few denoiser passes that make
    the buffer's first chunk clean, and the executor runs that chunk. The buffer (a partly denoised future) is
    episode state, so it lives here and ``reset`` clears it; the policy stays stateless."""

    def __init__(
        self,
        policy: StreamingPolicy,
        n_obs_steps: int,
        n_action_steps: int,
        action_offset: int | None = None,
        device: str | torch.device = "cpu",
        discrete_dims: list[int] | None = None,
        snap_values: list[float] | None = None,
    ) -> None:
        if not callable(getattr(policy, "stream", None)):
            raise ValueError(
                f"the streaming executor needs a policy with stream(obs, buffer); got {type(policy).__name__}"
            )
        super().__init__(
            policy,  # type: ignore[arg-type]
            n_obs_steps,
            n_action_steps,
            action_offset,
            None,
            device,
            discrete_dims,
            snap_values,
        )

    def reset(self, batch_size: int) -> None:
        super().reset(batch_size)
        self._buffer: torch.Tensor | None = None

    def _query(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        chunk, self._buffer = self.policy.stream(obs, self._buffer)  # type: ignore[attr-defined]
        return chunk


class RTIExecutor(ChunkExecutor):
    """Real-time iteration (RTI-DP, Duan et al. 2025): the first query of an episode samples a chunk from noise;
    afterwards, every ``rti_every`` steps, the previous clean chunk is shifted left by the steps executed since it
    was computed, padded at the end by repeating its last action, noised to the intermediate level ``rti_start`` and
    refined with ``rti_steps`` denoising steps under the new observation window. Consecutive chunks differ little
    (one step of new observations), so a few steps from a warm start replace a full sampling run, as real-time
    iteration in nonlinear MPC warm-starts each solve from the shifted previous solution. Denoiser passes per
    query = ``rti_steps`` (x2 for a midpoint flow sampler). The previous chunk is episode state and lives here;
    the policy stays stateless. Defaults (3 steps from level 0.2, every 4 steps): on Push-T these scored within
    0.02 of DDIM-10 open-loop chunks, where refining every step lost 0.08 (BENCHMARKS.md, deployment)."""

    def __init__(
        self,
        policy: RefinablePolicy,
        n_obs_steps: int,
        action_offset: int | None = None,
        device: str | torch.device = "cpu",
        rti_steps: int = 3,
        rti_start: float = 0.2,
        rti_every: int = 4,
        discrete_dims: list[int] | None = None,
        snap_values: list[float] | None = None,
    ) -> None:
        if not callable(getattr(policy, "refine_action_chunk", None)):
            raise ValueError(
                f"{type(policy).__name__} has no refine_action_chunk(obs, actions, num_steps, start), so executor "
                f"must be one of {_executors_without('rti')} for it, got 'rti'"
            )
        check_int("rti_steps", rti_steps, 1)
        check_int("rti_every", rti_every, 1)
        if isinstance(rti_start, bool) or not isinstance(rti_start, (int, float)) or not 0 < rti_start <= 1:
            raise ValueError(f"rti_start must be a float in (0, 1], got {rti_start!r}")
        # Executed actions per query = rti_every; the base class then checks that chunks cover them.
        super().__init__(policy, n_obs_steps, rti_every, action_offset, None, device, discrete_dims, snap_values)
        self.rti_steps = rti_steps
        self.rti_start = float(rti_start)
        self.rti_every = rti_every

    def reset(self, batch_size: int) -> None:
        super().reset(batch_size)
        self._chunk: np.ndarray | None = None  # the last clean chunk [B, H, Da], raw units
        self._age = 0  # control steps executed from it

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        if self.batch_size is None:
            raise RuntimeError("call reset(batch_size) before act()")
        self._append(obs)
        if self._chunk is None or self._age == self.rti_every:
            with torch.no_grad():
                window = self._obs_window()
                if self._chunk is None:
                    chunk = self.policy.predict_action_chunk(window)
                else:
                    warm = torch.as_tensor(shift_chunk(self._chunk, self._age), device=self.device)
                    chunk = self.policy.refine_action_chunk(  # type: ignore[attr-defined]
                        window, warm, num_steps=self.rti_steps, start=self.rti_start
                    )
            self._chunk, self._age = self._checked(chunk), 0
        action = self._chunk[:, self.action_offset + self._age]
        self._age += 1
        self._t += 1
        return self._snap(action)


def shift_chunk(chunk: np.ndarray, k: int) -> np.ndarray:
    """RTI's warm start: ``chunk [B, H, Da]`` shifted left by ``k`` steps (0 <= k < H), the freed end filled by
    repeating the last action -> ``[B, H, Da]``."""
    if not 0 <= k < chunk.shape[1]:
        raise ValueError(f"shift must be in [0, H={chunk.shape[1]}), got {k}")
    return np.concatenate([chunk[:, k:], np.repeat(chunk[:, -1:], k, axis=1)], axis=1)


def _check_snapping(
    discrete_dims: list[int] | None, snap_values: list[float] | None
) -> tuple[list[int], list[float] | None]:
    dims = [] if discrete_dims is None else list(discrete_dims)
    for d in dims:
        check_int("discrete_dims entry", d, 0)
    if len(set(dims)) != len(dims):
        raise ValueError(f"discrete_dims must not repeat a dimension, got {dims}")
    if snap_values is not None:
        values = list(snap_values)
        if not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        ):
            raise ValueError(f"snap_values must be a non-empty list of finite numbers, got {snap_values!r}")
        snap_values = [float(v) for v in values]
    if dims and snap_values is None:
        raise ValueError(f"discrete_dims {dims} need snap_values (e.g. [0.0, 1.0] for a gripper), got None")
    return dims, snap_values


EXECUTORS = ("chunk", "ensemble", "rti", "streaming")
DEFAULT_ENSEMBLE_K = 0.01  # ACT's temporal-ensembling weight exp(-k i) (Zhao et al. 2023, sec. 3.3)
_SNAP_OPTIONS = ("discrete_dims", "snap_values")
# The options each kind takes through make_executor's **options (temporal_ensemble is a named argument).
EXECUTOR_OPTIONS: dict[str, tuple[str, ...]] = {
    "chunk": _SNAP_OPTIONS,
    "ensemble": _SNAP_OPTIONS,
    "rti": ("rti_steps", "rti_start", "rti_every", *_SNAP_OPTIONS),
    "streaming": _SNAP_OPTIONS,
}


def _executors_without(kind: str) -> tuple[str, ...]:
    return tuple(k for k in EXECUTORS if k != kind)


def make_executor(
    kind: str,
    policy: ChunkPolicy,
    n_obs_steps: int,
    n_action_steps: int,
    temporal_ensemble: float | None = None,
    device: str | torch.device = "cpu",
    **options: Any,
) -> ChunkExecutor:
    """``kind`` one of ``EXECUTORS``; ``options`` those of ``EXECUTOR_OPTIONS[kind]`` (RTI's ``rti_steps``,
    ``rti_start``, ``rti_every``; every kind's ``discrete_dims``/``snap_values``). "ensemble" is the chunk executor
    with ``temporal_ensemble`` (default ``DEFAULT_ENSEMBLE_K``); "rti" replans every ``rti_every`` steps, so
    ``n_action_steps`` does not apply to it."""
    if kind not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {kind!r}")
    unknown = sorted(set(options) - set(EXECUTOR_OPTIONS[kind]))
    if unknown:
        raise ValueError(f"unknown options {unknown} for executor {kind!r}; allowed: {list(EXECUTOR_OPTIONS[kind])}")
    if temporal_ensemble is not None and kind in ("rti", "streaming"):
        raise ValueError(f"temporal_ensemble applies to the chunk and ensemble executors, not to executor={kind!r}")
    if kind == "chunk":
        return ChunkExecutor(
            policy, n_obs_steps, n_action_steps, temporal_ensemble=temporal_ensemble, device=device, **options
        )
    if kind == "ensemble":
        k = DEFAULT_ENSEMBLE_K if temporal_ensemble is None else temporal_ensemble
        return ChunkExecutor(policy, n_obs_steps, n_action_steps, temporal_ensemble=k, device=device, **options)
    if kind == "rti":
        return RTIExecutor(policy, n_obs_steps, device=device, **options)  # type: ignore[arg-type]
    return StreamingExecutor(policy, n_obs_steps, n_action_steps, device=device, **options)  # type: ignore[arg-type]
