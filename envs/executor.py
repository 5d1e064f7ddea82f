"""Action-chunk execution: the one owner of observation history, action queues and temporal ensembling.

Used identically by simulated evaluation, RL rollouts and the real-time loop. Policies are stateless
(`predict_action_chunk(obs: {key: [B, To, ...]}, noise=None) -> [B, H, Da]` in raw units); everything that
depends on time lives here. All B environments replan at the same step (lockstep).

Chunk alignment: `chunk[:, action_offset]` is the action for the current (latest) observation.
Diffusion Policy predicts a horizon starting at the oldest observation, so the default offset is
`n_obs_steps - 1` and the executed actions are `chunk[:, To-1 : To-1+Ta]`.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Protocol

import numpy as np
import torch


class ChunkPolicy(Protocol):
    def predict_action_chunk(self, obs: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor: ...


class StreamingPolicy(Protocol):
    def stream(
        self, obs: dict[str, torch.Tensor], buffer: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class ChunkExecutor:
    """Turns a chunk policy into a per-step controller for a batch of B environments.

    Without ensembling the policy is queried every `n_action_steps` steps and its actions
    `chunk[:, offset : offset + n_action_steps]` are executed in order.

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
        self.batch_size: int | None = None

    def reset(self, batch_size: int) -> None:
        """Forget history and queued actions; the next `act` starts new episodes for `batch_size` envs."""
        check_int("batch_size", batch_size, 1)
        self.batch_size = batch_size
        self._history: dict[str, deque[np.ndarray]] = {}  # key -> To arrays [B, ...], oldest first
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
        return action

    def _append(self, obs: dict[str, np.ndarray]) -> None:
        if not obs:
            raise ValueError("obs must be a non-empty dict of arrays [B, ...], got an empty dict")
        if self._history and set(obs) != set(self._history):
            raise ValueError(f"obs keys must stay {sorted(self._history)} within an episode, got {sorted(obs)}")
        # Copy: vector envs may reuse their observation buffers between steps.
        obs = {key: np.array(value) for key, value in obs.items()}
        for key, value in obs.items():  # validate everything before changing any state
            if value.ndim < 1 or value.shape[0] != self.batch_size:
                raise ValueError(f"obs[{key!r}] must have shape [B={self.batch_size}, ...], got shape {value.shape}")
        for key, value in obs.items():
            if key not in self._history:
                # First step of an episode: pad the history by repeating the first observation, as Diffusion
                # Policy's MultiStepWrapper does, so the policy always sees To frames.
                self._history[key] = deque([value] * self.n_obs_steps, maxlen=self.n_obs_steps)
            else:
                self._history[key].append(value)

    def _obs_window(self) -> dict[str, torch.Tensor]:
        return {
            key: torch.as_tensor(np.stack(frames, axis=1), dtype=torch.float32, device=self.device)
            for key, frames in self._history.items()
        }  # key -> [B, To, ...]

    def _query(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The policy's chunk ``[B, H, Da]`` for the observation window."""
        return self.policy.predict_action_chunk(obs)

    def _predict(self) -> np.ndarray:
        """Query the policy on the history; returns the executable actions [B, Ta, Da]."""
        with torch.no_grad():
            chunk = self._query(self._obs_window())
        chunk = chunk.detach().to("cpu", torch.float32).numpy()
        end = self.action_offset + self.n_action_steps
        if chunk.ndim != 3 or chunk.shape[0] != self.batch_size or chunk.shape[1] < end:
            raise ValueError(
                f"policy chunk must have shape [B={self.batch_size}, H>={end}, Da] "
                f"(action_offset {self.action_offset} + n_action_steps {self.n_action_steps}), "
                f"got {chunk.shape}"
            )
        return chunk[:, self.action_offset : end]

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
    ) -> None:
        if not callable(getattr(policy, "stream", None)):
            raise ValueError(
                f"the streaming executor needs a policy with stream(obs, buffer); got {type(policy).__name__}"
            )
        super().__init__(policy, n_obs_steps, n_action_steps, action_offset, None, device)  # type: ignore[arg-type]

    def reset(self, batch_size: int) -> None:
        super().reset(batch_size)
        self._buffer: torch.Tensor | None = None

    def _query(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        chunk, self._buffer = self.policy.stream(obs, self._buffer)  # type: ignore[attr-defined]
        return chunk


EXECUTORS = ("chunk", "streaming")


def make_executor(
    kind: str,
    policy: ChunkPolicy,
    n_obs_steps: int,
    n_action_steps: int,
    temporal_ensemble: float | None = None,
    device: str | torch.device = "cpu",
) -> ChunkExecutor:
    """``kind`` "chunk" (open loop or temporal ensembling) or "streaming" (rolling denoising buffer)."""
    if kind == "chunk":
        return ChunkExecutor(policy, n_obs_steps, n_action_steps, temporal_ensemble=temporal_ensemble, device=device)
    if kind == "streaming":
        if temporal_ensemble is not None:
            raise ValueError("temporal_ensemble applies to the chunk executor, not to executor='streaming'")
        return StreamingExecutor(policy, n_obs_steps, n_action_steps, device=device)  # type: ignore[arg-type]
    raise ValueError(f"executor must be one of {EXECUTORS}, got {kind!r}")
