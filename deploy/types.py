"""The small types every part of `deploy/` exchanges: timestamped observations, timestamped action chunks, the
robot interface and the chunk provider the control loop talks to.

Time is `time.monotonic()` seconds everywhere inside one machine (ROS header stamps are converted at the bridge).
Actions are raw (unnormalized) policy units, e.g. Push-T target positions in pixels or joint positions in rad.

Timestamp convention (asynchronous inference, RTC / SmolVLA-style): a chunk computed from the observation taken at
``t_obs`` carries its actions at ``t0 + i * dt``, ``t0 = t_obs`` for the action that belongs to that observation
(``chunk[:, n_obs_steps - 1]`` of a Diffusion Policy chunk), ``dt`` = the policy period. Synchronous sources (one
action per policy tick) send chunks of length 1.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np


@dataclasses.dataclass
class Observation:
    """One robot observation: ``data {key: array without a batch dim}`` (e.g. ``{"state": [20]}``) measured at
    ``stamp`` (monotonic seconds). ``info`` carries extra numbers a simulated robot reports (coverage, done)."""

    data: dict[str, np.ndarray]
    stamp: float
    info: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TimedChunk:
    """Actions ``[n, Da]`` at absolute times ``t0 + i * dt`` (monotonic seconds), computed from the observation taken
    at ``t_obs``; ``inference_s`` is the wall time the source spent on it."""

    t0: float
    dt: float
    actions: np.ndarray
    t_obs: float
    inference_s: float = 0.0

    def __post_init__(self) -> None:
        self.actions = np.asarray(self.actions, dtype=np.float64)
        if self.actions.ndim != 2 or self.actions.shape[0] < 1:
            raise ValueError(f"TimedChunk.actions must have shape [n >= 1, Da], got {self.actions.shape}")
        if not self.dt > 0:
            raise ValueError(f"TimedChunk.dt must be > 0, got {self.dt}")

    @property
    def times(self) -> np.ndarray:
        """``[n]`` absolute time of each action."""
        return self.t0 + self.dt * np.arange(len(self.actions))


class Robot(Protocol):
    """What the control loop drives: a simulated robot or real hardware, indistinguishable to the loop."""

    action_dim: int

    def start(self) -> None:
        """Connect / start the simulation clock; after it `read` returns observations."""

    def read(self) -> Observation | None:
        """The newest observation (non-blocking); None until the first one exists."""

    def command(self, target: np.ndarray, stamp: float) -> None:
        """Send one position target ``[Da]`` (raw units) for time ``stamp``; non-blocking."""

    def stop(self) -> None:
        """Stop issuing motion (hold position); used by HOLD and E-STOP."""

    def close(self) -> None:
        """Release processes, sockets, shared memory."""


class ChunkProvider(Protocol):
    """The control loop's side of inference (which runs in another process): non-blocking request/poll."""

    def reset(self) -> None:
        """New episode: forget the source's history and buffers; drop pending results."""

    def observe(self, obs: Observation) -> None:
        """Add ``obs`` to the source's observation history without asking for actions (non-blocking). The loop
        calls it once per policy tick in async mode, so that the policy's ``n_obs_steps`` window holds frames one
        policy period apart, as in training, although chunks are requested far less often."""

    def request(self, obs: Observation) -> bool:
        """Ask for actions for ``obs`` (non-blocking); returns False (and does nothing) while one is pending."""

    def poll(self) -> TimedChunk | None:
        """A finished result, or None (non-blocking)."""

    def close(self) -> None:
        """Stop the inference process."""
