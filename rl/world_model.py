"""World-model RL (DiWA, 2025): learn Push-T dynamics from the demonstrations plus a small budget of real rollouts,
improve the policy entirely inside the model, measure it in the real simulator.

- ``DynamicsEnsemble``: E probabilistic MLPs (PETS, Chua et al. 2018). Input: the normalized observation window
  ``[To * 20]`` (the base's normalizer) and the normalized action ``[2]``; output: a Gaussian over the change of the
  state ``[20]`` (normalized units, standardized), its log-variance softly bounded between learned limits (PETS app.
  A.1); Gaussian NLL. The window rather than the current state alone: Push-T observations hold positions but no
  velocities; on the held-out demonstration episodes the one-step error of one MLP halves with two frames (1.3e-5 ->
  7.7e-6 normalized MSE after 3k steps).
- Reward and termination are not learned: the 9 block keypoints of the state fix the block pose (2-D Kabsch fit), so
  the environment's own reward (goal coverage, ``envs.pusht``) and success rule (coverage > 0.95) are applied to the
  predicted state, as PETS uses known reward functions. A learned reward would rarely see success: the recorded
  demonstration states never reach it (their reward is at most 0.949), only successful real rollouts do.
- ``ImaginedLoop``: ``rl.env_loop.EnvLoop`` whose simulators are the model (``ModelVectorEnv``, the vector-env
  interface EnvLoop drives), so every method runs inside it unchanged. Episodes start from real initial states (the
  demonstrations' first states and the real episodes' first observations), end at predicted success (terminated) or
  after ``imagined_horizon`` steps (truncated); ``env_steps`` counts imagined steps.
- ``WorldModel`` (``world_model``): one Dyna cycle (Sutton 1991) per ``iterate()``: real steps with the current policy
  (the base in the first cycle) through ``self.loop``, a refit of the ensemble, then the policy update in
  imagination: DSRL (``rl.dsrl``) or DPPO (``rl.dppo``) on the imagined loop. The adapter is theirs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from envs.pusht import BLOCK_KEYPOINTS_LOCAL, coverage, reward_from_coverage
from policies.base import Policy
from rl.adapters import freeze
from rl.dppo import DPPOConfig
from rl.dsrl import DSRLConfig
from rl.env_loop import TRAIN_SEED_STRIDE, EnvLoop
from rl.methods import Method, MethodConfig, MethodContext, pack_state, register_method, unpack_state
from rl.networks import MLP

POLICY_UPDATES = ("dsrl", "dppo")
STATE_SHAPE = {"state": [20]}  # Push-T keypoint observations: the 9 block keypoints (x, y), then the agent (x, y)


def block_pose(keypoints: np.ndarray) -> np.ndarray:
    """``[..., 9, 2]`` world keypoints -> ``[..., 3]`` block (x, y, angle): the rigid motion of
    ``BLOCK_KEYPOINTS_LOCAL`` closest to them in least squares (2-D Kabsch: the angle of the cross-covariance)."""
    local_mean = BLOCK_KEYPOINTS_LOCAL.mean(0)
    p = BLOCK_KEYPOINTS_LOCAL - local_mean  # [9, 2]
    q_mean = keypoints.mean(-2)
    q = keypoints - q_mean[..., None, :]
    angle = np.arctan2((p[:, 0] * q[..., 1] - p[:, 1] * q[..., 0]).sum(-1), (p * q).sum((-2, -1)))
    cos, sin = np.cos(angle), np.sin(angle)
    x = q_mean[..., 0] - (cos * local_mean[0] - sin * local_mean[1])
    y = q_mean[..., 1] - (sin * local_mean[0] + cos * local_mean[1])
    return np.stack([x, y, angle], axis=-1)


def pusht_reward(state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The environment's ``(reward, terminated)`` of keypoint observations ``state [..., 20]`` (``envs.pusht``)."""
    state = np.asarray(state, dtype=np.float64)
    pose = block_pose(state[..., :18].reshape(*state.shape[:-1], 9, 2))
    return reward_from_coverage(coverage(np.concatenate([state[..., 18:], pose], axis=-1)))


class DynamicsEnsemble(nn.Module):
    """E Gaussian MLPs ``[N, D_in] -> (mean, log-var) [E, N, D_out]`` in standardized target units; ``target_mean``
    and ``target_std`` (buffers, fitted once) map them to raw targets."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dims: list[int], ensemble_size: int) -> None:
        super().__init__()
        self.members = nn.ModuleList(MLP(in_dim, hidden_dims, 2 * out_dim) for _ in range(ensemble_size))
        # PETS (Chua et al. 2018, app. A.1): learned soft bounds keep the log-variance finite outside the data.
        self.max_logvar = nn.Parameter(torch.full((out_dim,), 0.5))
        self.min_logvar = nn.Parameter(torch.full((out_dim,), -10.0))
        self.register_buffer("target_mean", torch.zeros(out_dim))
        self.register_buffer("target_std", torch.ones(out_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [E, N, D_in]`` (a batch per member) or ``[N, D_in]`` (shared) -> ``(mean, logvar) [E, N, D_out]``."""
        out = torch.stack([m(x[i] if x.ndim == 3 else x) for i, m in enumerate(self.members)])
        mean, logvar = out.chunk(2, dim=-1)
        logvar = self.max_logvar - F.softplus(self.max_logvar - logvar)
        return mean, self.min_logvar + F.softplus(logvar - self.min_logvar)

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Gaussian NLL (up to constants) of raw ``target [E, N, D_out]`` given ``x [E, N, D_in]``, plus PETS'
        0.01-weighted penalty that tightens the log-variance bounds."""
        mean, logvar = self(x)
        y = (target - self.target_mean) / self.target_std
        nll = ((mean - y).pow(2) * torch.exp(-logvar) + logvar).mean()
        return nll + 0.01 * (self.max_logvar.sum() - self.min_logvar.sum())

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The ensemble's mean prediction ``[N, D_out]`` in raw target units."""
        return self(x)[0].mean(0) * self.target_std + self.target_mean

    @torch.no_grad()
    def sample(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One draw per row ``[N, D_out]`` (raw units) from the Gaussian of a member chosen per row: PETS'
        trajectory sampling (TS1)."""
        mean, logvar = self(x)
        rows = torch.arange(len(x), device=x.device)
        member = torch.randint(len(self.members), (len(x),), generator=generator, device=x.device)
        mean, std = mean[member, rows], (0.5 * logvar[member, rows]).exp()
        y = mean + std * torch.randn(mean.shape, generator=generator, device=x.device)
        return y * self.target_std + self.target_mean


class ModelVectorEnv:
    """The vector-env interface ``EnvLoop`` drives, simulated by the ensemble: ``reset(seed=[B seeds]) -> (obs,
    info)`` starts env i from ``start_states[seed_i % N]`` (raw ``[N, 20]``; consecutive seeds walk through the pool),
    ``step(actions [B, Da] raw) -> (obs, reward, terminated, truncated, info)``. An env whose episode ended stays
    where it is (EnvLoop ignores it until the round ends)."""

    def __init__(
        self,
        model: DynamicsEnsemble,
        base: Policy,
        n_envs: int,
        horizon: int,
        start_states: torch.Tensor,
        generator: torch.Generator,
    ) -> None:
        self.model, self.normalizer, self.n_envs, self.horizon = model, base.normalizer, n_envs, horizon
        self.n_obs_steps = base.config.n_obs_steps
        self.start_states = start_states
        self.generator = generator

    def reset(self, seed: list[int]) -> tuple[dict[str, np.ndarray], dict]:
        idx = [s % len(self.start_states) for s in seed]
        first = self.normalizer.normalize("state", self.start_states[idx])  # [B, 20]
        self.window = first[:, None].repeat(1, self.n_obs_steps, 1)  # [B, To, 20], as ObsHistory pads a reset
        self.steps = np.zeros(self.n_envs, dtype=np.int64)
        self.ended = np.zeros(self.n_envs, dtype=bool)
        return {"state": self.start_states[idx].cpu().numpy()}, {}

    @torch.no_grad()
    def step(self, actions: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict]:
        action = self.normalizer.normalize("action", torch.as_tensor(actions, dtype=torch.float32))
        x = torch.cat([self.window.flatten(1), action.to(self.window.device)], dim=-1)
        running = torch.as_tensor(~self.ended, device=x.device)
        last = self.window[:, -1]
        state = torch.where(running[:, None], last + self.model.sample(x, self.generator), last)
        self.window = torch.cat([self.window[:, 1:], state[:, None]], dim=1)
        raw = self.normalizer.unnormalize("state", state).cpu().numpy()
        reward, terminated = pusht_reward(raw)
        self.steps += ~self.ended
        terminated &= ~self.ended
        truncated = ~self.ended & ~terminated & (self.steps >= self.horizon)
        self.ended |= terminated | truncated
        return {"state": raw}, reward, terminated, truncated, {}

    def close(self) -> None:
        """Nothing to release (EnvLoop.close closes its envs)."""


class ImaginedLoop(EnvLoop):
    """``EnvLoop`` over a ``ModelVectorEnv``: the same rounds, decisions, rewards, termination and statistics;
    ``env_steps`` counts imagined steps."""

    def __init__(self, envs: ModelVectorEnv, reward: str, seed: int, device: str | torch.device) -> None:
        # EnvLoop's state without its simulators (EnvLoop.__init__ builds Push-T processes).
        self.n_envs, self.n_obs_steps, self.reward = envs.n_envs, envs.n_obs_steps, reward
        self.device = torch.device(device)
        self.envs = envs
        self.first_seed = TRAIN_SEED_STRIDE * (seed + 1)
        self.next_episode = 0
        self.env_steps = 0
        self.episodes = []
        self.live = np.zeros(envs.n_envs, dtype=bool)


@register_method("world_model")
@dataclasses.dataclass
class WorldModelConfig(MethodConfig):
    """``hidden_dims`` and ``lr`` are each ensemble member's; ``gamma`` discounts the policy update in imagination
    (it replaces ``dsrl.gamma`` / ``dppo.gamma``)."""

    policy_update: str = "dppo"  # POLICY_UPDATES: DSRL or DPPO inside the model
    hidden_dims: list[int] = dataclasses.field(default_factory=lambda: [200, 200, 200])
    lr: float = 1e-3
    ensemble_size: int = 5
    model_batch_size: int = 256  # per member; each draws its own minibatch
    model_steps_per_cycle: int = 1000  # gradient steps of the refit after each real collection
    holdout_ratio: float = 0.1  # share of real transitions held out (the demonstrations' validation episodes are too)
    real_steps_per_cycle: int = 2000
    imagined_steps_per_cycle: int = 20000
    imagined_envs: int = 32
    imagined_horizon: int = 100  # imagined episodes are truncated after this many steps
    dsrl: DSRLConfig = dataclasses.field(default_factory=DSRLConfig)
    dppo: DPPOConfig = dataclasses.field(default_factory=DPPOConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.policy_update not in POLICY_UPDATES:
            raise ValueError(f"policy_update must be one of {POLICY_UPDATES}, got {self.policy_update!r}")
        for name in (
            "ensemble_size",
            "model_batch_size",
            "real_steps_per_cycle",
            "imagined_steps_per_cycle",
            "imagined_envs",
            "imagined_horizon",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.model_steps_per_cycle < 0:
            raise ValueError(f"model_steps_per_cycle must be >= 0, got {self.model_steps_per_cycle}")
        if not 0 <= self.holdout_ratio < 1:
            raise ValueError(f"holdout_ratio must be in [0, 1), got {self.holdout_ratio}")

    def policy_config(self) -> MethodConfig:
        """The policy update's config, with this config's discount."""
        return dataclasses.replace(getattr(self, self.policy_update), gamma=self.gamma)

    def build(self, base: Policy, loop: EnvLoop, context: MethodContext) -> WorldModel:
        return WorldModel(self, base, loop, context)


class WorldModel(Method):
    config: WorldModelConfig

    def __init__(self, config: WorldModelConfig, base: Policy, loop: EnvLoop, context: MethodContext) -> None:
        super().__init__(config, base, loop, context)
        if base.shape_meta["obs"] != STATE_SHAPE:
            raise ValueError(
                f"world_model learns Push-T dynamics on keypoint states {STATE_SHAPE}; the base observes "
                f"{base.shape_meta['obs']}"
            )
        if context.task is None:
            raise ValueError("world_model needs the task's demonstrations (MethodContext.task)")
        freeze(base)
        pc = base.config
        self.exec_slice = slice(pc.n_obs_steps - 1, pc.n_obs_steps - 1 + pc.n_action_steps)
        self.generator = torch.Generator(self.device).manual_seed(context.seed)
        self.model = DynamicsEnsemble(
            pc.n_obs_steps * 20 + base.action_dim, 20, config.hidden_dims, config.ensemble_size
        ).to(self.device)
        self.model_optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        # Transitions: model inputs x [N, To*20 + Da] and targets y [N, 20] (next state - state, normalized).
        self.demos, demo_starts = self._demonstrations()
        self.real: dict[str, dict[str, torch.Tensor]] = {
            split: {"x": self.demos["train"]["x"][:0], "y": self.demos["train"]["y"][:0]}
            for split in ("train", "heldout")
        }
        self.real_starts = demo_starts[:0]  # [N, 20] raw first observations of the real episodes
        y = self.demos["train"]["y"]
        self.model.target_mean.copy_(y.mean(0))
        self.model.target_std.copy_(y.std(0).clamp_min(1e-6))
        self.demo_starts = demo_starts  # [E, 20] raw; imagined episodes start from these and the real starts
        self.envs = ModelVectorEnv(
            self.model, base, config.imagined_envs, config.imagined_horizon, demo_starts, self.generator
        )
        self.imagined = ImaginedLoop(self.envs, loop.reward, context.seed, self.device)
        self.inner = config.policy_config().build(base, self.imagined, context)
        self.adapter = self.inner.adapter
        self.real_obs: dict[str, torch.Tensor] | None = None
        self.cycles = 0

    # -- data ---------------------------------------------------------------------------------------------------
    def model_input(self, obs: dict[str, torch.Tensor], action: torch.Tensor) -> torch.Tensor:
        """``obs {"state": [B, To, 20]}``, ``action [B, Da]`` raw -> ``[B, To * 20 + Da]`` normalized."""
        nz = self.base.normalizer
        return torch.cat([nz.normalize("state", obs["state"]).flatten(1), nz.normalize("action", action)], dim=-1)

    def model_target(self, obs: dict[str, torch.Tensor], next_state: torch.Tensor) -> torch.Tensor:
        """The change of the normalized state ``[B, 20]`` from the window's last frame to ``next_state [B, 20]``."""
        nz = self.base.normalizer
        return nz.normalize("state", next_state) - nz.normalize("state", obs["state"][:, -1])

    @torch.no_grad()
    def _demonstrations(self) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
        """One-step transitions of the task's training (-> "train") and validation (-> "heldout") episodes, and the
        training episodes' first states ``[E, 20]`` raw."""
        to = self.base.config.n_obs_steps
        # Windows of To + 1 observations: the model's input window, then the next state; the action at To - 1.
        datasets = self.context.task.datasets(to + 1, to + 1, 1)
        out: dict[str, dict[str, torch.Tensor]] = {}
        for split, dataset in zip(("train", "heldout"), datasets, strict=True):
            # The window padded before an episode's first step repeats that step throughout: its first state, and
            # not a transition (every other window has distinct indices).
            first = dataset.indices[:, to] == dataset.indices[:, to - 1]  # [N]
            batch = dataset.get_batch(torch.arange(len(dataset)))
            state = batch["obs"]["state"].to(self.device)  # [N, To + 1, 20]
            obs = {"state": state[:, :to]}
            x = self.model_input(obs, batch["action"][:, to - 1].to(self.device))
            out[split] = {"x": x[~first], "y": self.model_target(obs, state[:, to])[~first]}
            if split == "train":
                starts = state[first, 0]
        return out, starts

    def _add_real(
        self, obs: dict[str, torch.Tensor], action: torch.Tensor, next_obs: dict[str, torch.Tensor], live: torch.Tensor
    ) -> None:
        x, y = self.model_input(obs, action)[live], self.model_target(obs, next_obs["state"][:, -1])[live]
        heldout = torch.rand(len(x), generator=self.generator, device=self.device) < self.config.holdout_ratio
        for split, mask in (("train", ~heldout), ("heldout", heldout)):
            self.real[split] = {
                "x": torch.cat([self.real[split]["x"], x[mask]]),
                "y": torch.cat([self.real[split]["y"], y[mask]]),
            }

    def transitions(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Demonstration and real transitions of ``split`` ("train" or "heldout"): ``(x [N, D_in], y [N, 20])``."""
        return (
            torch.cat([self.demos[split]["x"], self.real[split]["x"]]),
            torch.cat([self.demos[split]["y"], self.real[split]["y"]]),
        )

    # -- the Dyna cycle ---------------------------------------------------------------------------------------
    def iterate(self) -> dict[str, float]:
        cfg = self.config
        started = time.perf_counter()
        self.collect_real(cfg.real_steps_per_cycle)
        collected = time.perf_counter()
        model_logs = self.fit_model(cfg.model_steps_per_cycle)
        fitted = time.perf_counter()
        start = self.imagined.env_steps
        policy_logs: dict[str, float] = {}
        while self.imagined.env_steps - start < cfg.imagined_steps_per_cycle:
            policy_logs = self.inner.iterate() or policy_logs
        self.cycles += 1
        imagined = {k.replace("train/", "imagined/"): v for k, v in self.imagined.recent_stats(50).items()}
        return {
            "train/real_env_steps": float(self.loop.env_steps),
            "train/imagined_steps": float(self.imagined.env_steps),
            **model_logs,
            **imagined,
            **{k.replace("train/", "policy/"): v for k, v in policy_logs.items()},
            "time/real_s": collected - started,
            "time/model_s": fitted - collected,
            "time/imagined_s": time.perf_counter() - fitted,
        }

    @torch.no_grad()
    def collect_real(self, n_steps: int) -> None:
        """``n_steps`` real steps (capped by what is left of ``MethodContext.env_step_budget``), with the current
        policy sampled as it acts (the base's own noise in the first cycle; then the adapter with a random
        ``noise``: DSRL's stochastic latent actor, the DPPO copy's random initial noise). Decisions of one step
        each, so every step's state becomes a transition, and collection stops at the step that reaches the count
        (a chunk cut there is replanned next cycle): the count overshoots by fewer than ``n_envs`` steps, where
        whole chunk rounds overshot by up to ``n_envs * n_action_steps`` per cycle."""
        policy = self.base if self.cycles == 0 else self.adapter
        pc = self.base.config
        start = self.loop.env_steps
        if self.context.env_step_budget is not None:
            n_steps = min(n_steps, self.context.env_step_budget - start)
        while self.loop.env_steps - start < n_steps:
            if self.real_obs is None or self.loop.round_over:
                self.real_obs = self.loop.reset()
                self.real_starts = torch.cat([self.real_starts, self.real_obs["state"][:, -1]])
                self.envs.start_states = torch.cat([self.demo_starts, self.real_starts])
            obs = self.real_obs
            noise = torch.randn(
                (self.loop.n_envs, pc.horizon, self.base.action_dim), generator=self.generator, device=self.device
            )
            chunk = policy.predict_action_chunk(obs, noise=noise)
            for action in chunk[:, self.exec_slice].unbind(1):  # [B, Da] each
                decision = self.loop.step(action[:, None])
                self._add_real(obs, action, decision.obs, torch.as_tensor(decision.live, device=self.device))
                obs = decision.obs
                if self.loop.round_over or self.loop.env_steps - start >= n_steps:
                    break
            self.real_obs = obs

    def fit_model(self, n_steps: int) -> dict[str, float]:
        """``n_steps`` Adam steps of the ensemble on the training transitions; the one-step error of the ensemble
        mean on the held-out ones (normalized state units)."""
        x, y = self.transitions("train")
        e, b = self.config.ensemble_size, self.config.model_batch_size
        loss = torch.zeros(())
        for _ in range(n_steps):
            idx = torch.randint(len(x), (e, b), generator=self.generator, device=self.device)
            loss = self.model.loss(x[idx], y[idx])
            self.model_optimizer.zero_grad()
            loss.backward()
            self.model_optimizer.step()
        logs = {"model/loss": loss.item(), "model/train_transitions": float(len(x))}
        x_heldout, y_heldout = self.transitions("heldout")
        if len(x_heldout):
            logs["model/one_step_mse_heldout"] = (self.model.predict(x_heldout) - y_heldout).pow(2).mean().item()
        return logs

    # -- resume -------------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The ensemble and its optimizer, the real transitions and start states, the imagined loop's counters and
        the policy update's own state (prefixed ``inner.``)."""
        tensors, meta = pack_state({"model": self.model}, {"model_optimizer": self.model_optimizer})
        tensors |= {f"real.{split}.{k}": v.clone() for split, d in self.real.items() for k, v in d.items()}
        tensors |= {"real_starts": self.real_starts.clone(), "generator": self.generator.get_state()}
        inner_tensors, meta["inner"] = self.inner.state()
        tensors |= {f"inner.{k}": v for k, v in inner_tensors.items()}
        meta |= {
            "cycles": self.cycles,
            "imagined": {"env_steps": self.imagined.env_steps, "next_episode": self.imagined.next_episode},
        }
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        unpack_state(tensors, meta, {"model": self.model}, {"model_optimizer": self.model_optimizer})
        self.real = {split: {k: tensors[f"real.{split}.{k}"] for k in ("x", "y")} for split in ("train", "heldout")}
        self.real_starts = tensors["real_starts"]
        self.envs.start_states = torch.cat([self.demo_starts, self.real_starts])
        self.generator.set_state(tensors["generator"])
        self.inner.load_state(
            {k[len("inner.") :]: v for k, v in tensors.items() if k.startswith("inner.")}, meta["inner"]
        )
        self.cycles = int(meta["cycles"])
        self.imagined.env_steps = int(meta["imagined"]["env_steps"])
        self.imagined.next_episode = int(meta["imagined"]["next_episode"])
