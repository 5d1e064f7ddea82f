"""Residual SAC: soft actor-critic (Haarnoja et al. 2018) on the per-step residual of ``rl.residual_ppo``, the
off-policy option of ResiP (Ankile et al. 2024) / Policy Decorator (Yuan et al. 2024).

Per control step: ``a_base`` from the frozen base's chunk executor, ``x = [features(o_t), normalize(a_base)]``
(``[B, F + Da]``, ``ResidualPolicy.actor_input``), a residual ``r`` and the executed action ``apply_residual(a_base,
r)``. One ``iterate`` = one decision (n_envs env steps) into the replay buffer, then ``updates_per_step`` gradient
updates per live env step once ``learning_starts`` env steps of warm-up have been collected. The warm-up acts with
the initial actor (the base plus the residual's exploration noise), not uniform residuals, so early data stays near
the base's behaviour.

The summed action. The twin critics ``Q_i(x, a)`` take the executed action in normalized units,
``a = normalize(a_base) + residual_scale * r`` (what the environment ran), not ``r`` itself: since ``x`` contains
``normalize(a_base)`` this is a reparametrisation of ``Q(x, r)``, with the TD target and the critic's action
input both in the units of the environment's action (Policy Decorator's critic on the combined action).

The squashed residual. ``r = tanh(u)``, ``u ~ N(mu(x), diag(std)^2)``, with ``mu`` the adapter's actor MLP (output
layer zero at init) and ``std = exp(log_std)`` the adapter's state-independent, learned log-std. tanh bounds the
correction to ``residual_scale`` in normalized units, so the actor cannot push actions where the critics only
extrapolate (SAC's usual reason for squashing); the deterministic residual ``tanh(mu(x))`` is 0 at init, so the
adapter starts exactly at the base. The adapter is built with ``squash=True``: ``correct_action`` (evaluation and
deployment) applies ``tanh(mu(x))``, the mean this training optimizes.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch.distributions import Normal, TanhTransform, TransformedDistribution

from policies.base import Policy
from rl.adapters import ResidualPolicy
from rl.env_loop import EnvLoop
from rl.methods import Method, MethodConfig, MethodContext, pack_state, register_method, unpack_state
from rl.networks import LOG_STD_MAX, LOG_STD_MIN, TwinQ, soft_update
from rl.replay import ReplayBuffer
from rl.residual_ppo import ResidualStepper, residual_adapter


def td_target(
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    qf1_next_target: torch.Tensor,
    qf2_next_target: torch.Tensor,
    next_log_prob: torch.Tensor,
    alpha: float | torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """Soft Bellman target with clipped double Q (Haarnoja et al. 2018, eq. 3; Fujimoto et al. 2018), all ``[N]``:
    ``y = r + gamma * (1 - terminated) * (min(Q1', Q2')(x', a') - alpha * log pi(a'|x'))``, ``a' ~ pi(.|x')``.
    A truncated episode (step limit) is not terminated and bootstraps."""
    min_qf_next_target = torch.min(qf1_next_target, qf2_next_target) - alpha * next_log_prob
    return rewards + gamma * (1.0 - terminated.float()) * min_qf_next_target


def temperature_loss(log_alpha: torch.Tensor, log_prob: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """Automatic entropy temperature (Haarnoja et al. 2018b, eq. 18): ``-alpha * (log pi + H_target)``, mean over
    ``log_prob [N]``; its gradient raises alpha while the policy's entropy ``-log pi`` is below the target."""
    return (-log_alpha.exp() * (log_prob.detach() + target_entropy)).mean()


@register_method("residual_sac")
@dataclasses.dataclass
class ResidualSACConfig(MethodConfig):
    residual_scale: float = 0.1  # the tanh-bounded correction is at most this, in normalized action units
    init_log_std: float = -1.0  # of the pre-tanh residual; learned (state-independent)
    q_lr: float = 1e-3  # critics and temperature (``lr`` is the actor's), as CleanRL's SAC
    buffer_size: int = 200_000
    batch_size: int = 256
    learning_starts: int = 5_000  # env steps of warm-up before the first update
    updates_per_step: float = 0.5  # gradient updates per live env step after the warm-up (update-to-data ratio)
    tau: float = 0.005  # Polyak rate of the target critics
    init_alpha: float = 0.1  # initial entropy temperature (dense rewards are in [-1, 0] per step)
    target_entropy: float | None = None  # of the residual; None: -Da (Haarnoja et al. 2018b)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("residual_scale", "q_lr", "updates_per_step", "init_alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("buffer_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_starts < 0:
            raise ValueError(f"learning_starts must be >= 0, got {self.learning_starts}")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")

    def build(self, base: Policy, loop: EnvLoop, context: MethodContext) -> ResidualSAC:
        return ResidualSAC(self, base, loop, context)


class ResidualSAC(Method):
    config: ResidualSACConfig
    adapter: ResidualPolicy

    def __init__(self, config: ResidualSACConfig, base: Policy, loop: EnvLoop, context: MethodContext) -> None:
        super().__init__(config, base, loop, context)
        self.adapter = residual_adapter(
            base,
            self.device,
            residual_scale=config.residual_scale,
            hidden_dims=config.hidden_dims,
            init_log_std=config.init_log_std,
            learn_log_std=True,
            squash=True,
        )
        self.stepper = ResidualStepper(self.adapter, loop, self.device)
        da = self.adapter.action_dim
        self.qf = TwinQ(self.adapter.input_dim, da, config.hidden_dims).to(self.device)
        self.qf_target = copy.deepcopy(self.qf).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(config.init_alpha), device=self.device, requires_grad=True)
        self.target_entropy = -float(da) if config.target_entropy is None else config.target_entropy
        self.actor_optimizer = torch.optim.Adam(self.adapter.trainable_parameters(), lr=config.lr)
        self.q_optimizer = torch.optim.Adam(self.qf.parameters(), lr=config.q_lr)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=config.q_lr)
        d = self.adapter.input_dim
        # Transitions: x [F + Da], the summed action [Da] (normalized), reward, x' [F + Da], terminated.
        shapes = {"x": (d,), "action": (da,), "reward": (), "next_x": (d,), "terminated": ()}
        self.buffer = ReplayBuffer(config.buffer_size, shapes, self.device)
        self.update_credit = 0.0  # fractional updates owed (updates_per_step per live env step)
        self.base_action = self.x = torch.empty(0)  # the current decision's a_base [B, Da] and x [B, F + Da]

    def sample_residual(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised ``r = tanh(mu(x) + std * xi)`` ``[N, Da]`` and ``log pi(r|x)`` ``[N]`` (with the tanh
        Jacobian, Haarnoja et al. 2018, app. C; the cached pre-tanh value avoids atanh)."""
        mean = self.adapter.actor(x)
        std = self.adapter.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).exp().expand_as(mean)
        dist = TransformedDistribution(Normal(mean, std), TanhTransform(cache_size=1))
        residual = dist.rsample()
        return residual, dist.log_prob(residual).sum(-1)

    def summed_action(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The executed action in normalized units ``[N, Da]``: ``x``'s last Da entries are ``normalize(a_base)``
        (``ResidualPolicy.actor_input``)."""
        return x[:, -self.adapter.action_dim :] + self.config.residual_scale * residual

    def iterate(self) -> dict[str, float]:
        if self.loop.round_over:
            self.base_action, self.x = self.stepper.reset()
        with torch.no_grad():
            residual, _ = self.sample_residual(self.x)
        decision, next_base_action, next_x = self.stepper.step(self.base_action, residual)
        live = torch.as_tensor(decision.live, device=self.device)
        self.buffer.add(
            x=self.x[live],
            action=self.summed_action(self.x, residual)[live],
            reward=torch.as_tensor(decision.rewards[:, 0], device=self.device)[live],
            next_x=next_x[live],
            terminated=torch.as_tensor(decision.terminated, device=self.device)[live],
        )
        self.base_action, self.x = next_base_action, next_x
        logs: dict[str, float] = {}
        if self.loop.env_steps >= self.config.learning_starts:
            self.update_credit += int(decision.n_steps.sum()) * self.config.updates_per_step
            while self.update_credit >= 1:
                logs = self.update()
                self.update_credit -= 1
        return logs

    def update(self) -> dict[str, float]:
        """One SAC update on a replay minibatch (critics, actor, temperature, then the target critics)."""
        data = self.buffer.sample(self.config.batch_size)
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            next_residual, next_log_prob = self.sample_residual(data["next_x"])
            qf1_next_target, qf2_next_target = self.qf_target(
                data["next_x"], self.summed_action(data["next_x"], next_residual)
            )
            next_q_value = td_target(
                data["reward"],
                data["terminated"],
                qf1_next_target,
                qf2_next_target,
                next_log_prob,
                alpha,
                self.config.gamma,
            )
        qf1_a_values, qf2_a_values = self.qf(data["x"], data["action"])
        qf1_loss = F.mse_loss(qf1_a_values, next_q_value)
        qf2_loss = F.mse_loss(qf2_a_values, next_q_value)
        qf_loss = qf1_loss + qf2_loss
        self.q_optimizer.zero_grad()
        qf_loss.backward()
        self.q_optimizer.step()

        residual, log_prob = self.sample_residual(data["x"])
        qf1_pi, qf2_pi = self.qf(data["x"], self.summed_action(data["x"], residual))
        actor_loss = (alpha * log_prob - torch.min(qf1_pi, qf2_pi)).mean()
        self.actor_optimizer.zero_grad()
        actor_loss.backward()
        self.actor_optimizer.step()

        alpha_loss = temperature_loss(self.log_alpha, log_prob, self.target_entropy)
        self.alpha_optimizer.zero_grad()
        alpha_loss.backward()
        self.alpha_optimizer.step()

        soft_update(self.qf_target, self.qf, self.config.tau)
        return {
            "train/qf1_values": qf1_a_values.mean().item(),
            "train/qf1_loss": qf1_loss.item(),
            "train/qf2_loss": qf2_loss.item(),
            "train/actor_loss": actor_loss.item(),
            "train/alpha": alpha.item(),
            "train/alpha_loss": alpha_loss.item(),
            "train/entropy": (-log_prob.mean()).item(),
            "train/log_std": self.adapter.log_std.mean().item(),
        }

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = pack_state({"qf": self.qf, "qf_target": self.qf_target}, self.optimizers())
        buffer_tensors, meta["buffer"] = self.buffer.state("buffer")
        meta["update_credit"] = self.update_credit
        return {**tensors, **buffer_tensors, "log_alpha": self.log_alpha.detach().cpu().clone()}, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        unpack_state(tensors, meta, {"qf": self.qf, "qf_target": self.qf_target}, self.optimizers())
        self.buffer.load_state("buffer", tensors, meta["buffer"])
        self.update_credit = meta["update_credit"]
        with torch.no_grad():
            self.log_alpha.copy_(tensors["log_alpha"])

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {
            "actor_optimizer": self.actor_optimizer,
            "q_optimizer": self.q_optimizer,
            "alpha_optimizer": self.alpha_optimizer,
        }
