"""The one environment loop of RL adaptation: rounds of ``n_envs`` Push-T episodes stepped in lockstep.

Every method collects real experience through ``EnvLoop``: a decision is ``actions [B, T, Da]`` (T = 1 for a
per-step residual, T = n_action_steps for a chunk-level noise policy), executed step by step; an env whose episode
ends within the T steps executes no more of them. All B envs start a round together (as ``envs.evaluate`` does),
so chunk executors replan in lockstep; a round ends when every episode has ended, and ``reset`` starts the next one.

Training episodes use seeds ``1_000_000 * (seed + 1) + i`` (i counts episodes), never the test seeds 100000..100049.

Rewards (``reward=``):
- ``dense``: ``clip(coverage / 0.95, 0, 1) - 1`` per step, in [-1, 0] and 0 at success. A cost rather than the
  evaluation reward itself because episodes end at success: with a positive per-step reward, lingering near the goal
  would be worth more than finishing;
- ``sparse``: 1 on the step that reaches coverage > 0.95, else 0.
Only steps of live episodes count in ``env_steps``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from envs.evaluate import make_vector_envs
from envs.executor import ObsHistory, check_int
from envs.pusht import OBS_MODES

REWARDS = ("dense", "sparse")
TRAIN_SEED_STRIDE = 1_000_000


@dataclasses.dataclass
class Decision:
    """The outcome of one decision for the B envs of a round."""

    obs: dict[str, torch.Tensor]  # the next window {key: [B, To, ...]}; for an episode that ended here, its last one
    rewards: np.ndarray  # [B, T] per-step rewards, 0 for steps not executed
    n_steps: np.ndarray  # [B] steps executed (0 for envs whose episode had already ended)
    terminated: np.ndarray  # [B] the episode ended in success during this decision (no bootstrapping)
    truncated: np.ndarray  # [B] the episode hit the step limit during this decision (bootstrap from obs)
    live: np.ndarray  # [B] the env was running at the start of the decision (its transition is real)

    def discounted_reward(self, gamma: float) -> np.ndarray:
        """``sum_k gamma^k r_k`` over the executed steps ``[B]`` (the reward of a T-step transition)."""
        return self.rewards @ (gamma ** np.arange(self.rewards.shape[1]))

    @property
    def done(self) -> np.ndarray:
        return self.terminated | self.truncated


@dataclasses.dataclass
class EpisodeStats:
    seed: int
    max_reward: float  # max_t clip(coverage_t / 0.95, 0, 1): the evaluation protocol's per-episode score
    success: bool
    length: int


class EnvLoop:
    """Lockstep rounds of Push-T training episodes. ``reset() -> obs window``; ``step(actions [B, T, Da])`` ->
    ``Decision``; ``round_over`` says when to reset; ``env_steps`` counts real steps; ``episodes`` the finished
    ones."""

    def __init__(
        self,
        obs_mode: str,
        n_envs: int,
        n_obs_steps: int,
        max_steps: int = 300,
        reward: str = "dense",
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if obs_mode not in OBS_MODES:
            raise ValueError(f"obs_mode must be one of {OBS_MODES}, got {obs_mode!r}")
        if reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")
        check_int("n_envs", n_envs, 1)
        check_int("n_obs_steps", n_obs_steps, 1)
        check_int("max_steps", max_steps, 1)
        check_int("seed", seed, 0)
        self.n_envs, self.n_obs_steps, self.reward, self.device = n_envs, n_obs_steps, reward, torch.device(device)
        # Ended envs autoreset on the next step and are ignored (not live) until the round ends.
        self.envs = make_vector_envs(n_envs, obs_mode, max_steps)
        self.first_seed = TRAIN_SEED_STRIDE * (seed + 1)
        self.next_episode = 0  # episodes started so far (the next seed's offset); saved for resume
        self.env_steps = 0
        self.episodes: list[EpisodeStats] = []
        self.live = np.zeros(n_envs, dtype=bool)

    @property
    def round_over(self) -> bool:
        return not self.live.any()

    def reset(self) -> dict[str, torch.Tensor]:
        """Start a round of ``n_envs`` new episodes; returns the observation window ``{key: [B, To, ...]}``."""
        self.seeds = [self.first_seed + self.next_episode + i for i in range(self.n_envs)]
        self.next_episode += self.n_envs
        obs, _ = self.envs.reset(seed=self.seeds)
        self.history = ObsHistory(self.n_obs_steps, self.n_envs)
        self.history.push(obs)
        self.live = np.ones(self.n_envs, dtype=bool)
        self.max_reward = np.zeros(self.n_envs)
        self.length = np.zeros(self.n_envs, dtype=np.int64)
        return self.history.window(self.device)

    def step(self, actions: np.ndarray | torch.Tensor) -> Decision:
        """Execute ``actions [B, T, Da]`` (raw units) for the live envs; returns the decision's outcome."""
        if self.round_over:
            raise RuntimeError("the round is over: call reset() to start new episodes")
        actions = torch.as_tensor(actions).detach().cpu().numpy() if isinstance(actions, torch.Tensor) else actions
        if actions.ndim != 3 or actions.shape[0] != self.n_envs:
            raise ValueError(f"actions must have shape [B={self.n_envs}, T, Da], got {actions.shape}")
        live_at_start = self.live.copy()
        n_t = actions.shape[1]
        rewards = np.zeros((self.n_envs, n_t))
        n_steps = np.zeros(self.n_envs, dtype=np.int64)
        terminated = np.zeros(self.n_envs, dtype=bool)
        truncated = np.zeros(self.n_envs, dtype=bool)
        final: dict[str, torch.Tensor] | None = None  # windows of the envs whose episode ended in this decision
        for k in range(n_t):
            obs, reward, term, trunc, _ = self.envs.step(actions[:, k])
            self.history.push(obs)
            live = self.live
            rewards[live, k] = reward[live] - 1.0 if self.reward == "dense" else term[live].astype(float)
            n_steps[live] += 1
            self.length[live] += 1
            self.max_reward[live] = np.maximum(self.max_reward[live], reward[live])
            terminated |= live & term
            truncated |= live & trunc & ~term
            ended = live & (term | trunc)
            if ended.any():
                # Keep the last window of an ended episode: later steps of this decision autoreset that env and
                # push the next episode's first observation, but a truncated episode bootstraps from its own.
                window = self.history.window(self.device)
                if final is None:
                    final = {key: value.clone() for key, value in window.items()}
                rows = torch.as_tensor(ended)
                for key, value in window.items():
                    final[key][rows] = value[rows]
            for i in np.flatnonzero(ended):
                self.episodes.append(
                    EpisodeStats(self.seeds[i], float(self.max_reward[i]), bool(term[i]), int(self.length[i]))
                )
            self.env_steps += int(live.sum())
            self.live = live & ~ended
            if self.round_over:
                break
        next_obs = self.history.window(self.device)
        if final is not None:
            rows = torch.as_tensor(terminated | truncated)
            for key, value in next_obs.items():
                value[rows] = final[key][rows]
        return Decision(next_obs, rewards, n_steps, terminated, truncated, live_at_start)

    def recent_stats(self, n: int) -> dict[str, float]:
        """Mean score and success of the last ``n`` finished training episodes (empty dict before any)."""
        recent = self.episodes[-n:]
        if not recent:
            return {}
        return {
            "train/score": float(np.mean([e.max_reward for e in recent])),
            "train/success_rate": float(np.mean([e.success for e in recent])),
            "train/episode_length": float(np.mean([e.length for e in recent])),
        }

    def close(self) -> None:
        self.envs.close()
