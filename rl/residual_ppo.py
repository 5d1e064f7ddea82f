"""Residual PPO (ResiP, Ankile et al. 2024): a per-step Gaussian residual on a frozen chunked base, trained on-policy.

Per control step t (a decision of ``EnvLoop`` with T = 1): the frozen base's chunk executor gives ``a_base [B, Da]``
(raw); the residual actor sees ``x = [features(o_t), normalize(a_base)]`` (``ResidualPolicy.actor_input``,
``[B, F + Da]``) and samples ``r ~ N(mu(x), diag(exp(log_std))^2)`` in normalized action units, with a
state-independent ``log_std`` (fixed or learned); the env executes ``apply_residual(a_base, r)``, i.e.
``a_base + residual_scale * r`` in normalized units. ``mu``'s output layer starts at zero, so the deterministic
policy (the mean, ``ResidualPolicy.correct_action``, which evaluation and deployment run) starts exactly at the base.
The value ``V(x)`` sees the same input.

One ``iterate`` = one round: all ``n_envs`` episodes run to their end (at most ``max_steps`` decisions), then PPO
(Schulman et al. 2017) epochs on the round's live transitions, advantages by GAE (Schulman et al. 2016) with
``terminated`` (success: no bootstrap) and ``truncated`` (step limit: bootstrap with ``V(x')``) kept apart.

The actor and the value are separate networks with separate Adam optimizers and gradient clipping: returns of the
dense reward reach tens, and with one shared clip the value gradients would scale the actor's down. With Adam a
value-loss coefficient would be normalized away, so the value has its own learning rate (``value_lr``) instead.

Also home of the pieces ``rl.residual_sac`` shares: ``residual_adapter`` and ``ResidualStepper``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import torch
from torch.distributions import Normal

from envs.executor import make_executor
from policies.base import Policy
from rl.adapters import ResidualConfig, ResidualPolicy, adapter_around
from rl.env_loop import Decision, EnvLoop
from rl.methods import Method, MethodConfig, MethodContext, pack_state, register_method, unpack_state
from rl.networks import MLP


def residual_adapter(base: Policy, device: torch.device, **fields: object) -> ResidualPolicy:
    """A ``ResidualPolicy`` around a copy of the loaded ``base`` (its weights and normalizer copied into the adapter's
    frozen ``base``); ``fields`` are ``ResidualConfig`` fields (residual_scale, hidden_dims, ...)."""
    return adapter_around(ResidualConfig, base, **fields).to(device)  # type: ignore[return-value]


class ResidualStepper:
    """Per-step control of ``loop`` by base + residual: the frozen base acts through its own chunk executor (the
    base's n_obs_steps / n_action_steps, open loop), fed the latest observation of every decision."""

    def __init__(self, adapter: ResidualPolicy, loop: EnvLoop, device: torch.device) -> None:
        c = adapter.config  # the base's n_obs_steps and n_action_steps (inherited)
        self.adapter, self.loop, self.device = adapter, loop, device
        self.executor = make_executor("chunk", adapter.base, c.n_obs_steps, c.n_action_steps, device=device)

    def reset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Start a round; returns the first ``(a_base [B, Da] raw, x [B, F + Da])``."""
        window = self.loop.reset()
        self.executor.reset(self.loop.n_envs)
        return self.observe(window)

    def observe(self, window: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``window {k: [B, To, ...]}`` -> the base's action for its latest frame and the residual actor's input."""
        latest = {k: v[:, -1].cpu().numpy() for k, v in window.items()}
        base_action = torch.as_tensor(self.executor.act(latest), device=self.device)
        with torch.no_grad():
            return base_action, self.adapter.actor_input(window, base_action)

    def step(self, base_action: torch.Tensor, residual: torch.Tensor) -> tuple[Decision, torch.Tensor, torch.Tensor]:
        """Execute ``apply_residual(a_base, r)`` for one step; returns the decision and the next ``(a_base, x)``."""
        with torch.no_grad():
            action = self.adapter.apply_residual(base_action, residual)
        decision = self.loop.step(action[:, None])
        return decision, *self.observe(decision.obs)


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    done: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> torch.Tensor:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16), all ``[T, B]``; returns advantages
    ``[T, B]``. ``next_values[t] = V(x_{t+1})`` of the step's own next observation, so a truncated episode
    bootstraps from its last observation; ``terminated`` removes the bootstrap and ``done`` (terminated or
    truncated) stops the recursion. Entries after an episode's end (not live) are garbage for the caller to mask."""
    not_terminated, not_done = 1.0 - terminated.float(), 1.0 - done.float()
    deltas = rewards + gamma * next_values * not_terminated - values  # TD errors delta_t
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        last = deltas[t] + gamma * gae_lambda * not_done[t] * last
        advantages[t] = last
    return advantages


def clipped_surrogate(
    new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_coef: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped objective (Schulman et al. 2017, eq. 7) as a loss, all ``[N]`` -> ``(pg_loss, approx_kl,
    clipfrac)`` scalars; ``approx_kl`` is the low-variance estimator E[(ratio - 1) - log ratio] (as in CleanRL)."""
    logratio = new_log_prob - old_log_prob
    ratio = logratio.exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1).abs() > clip_coef).float().mean()
    return pg_loss, approx_kl, clipfrac


@register_method("residual_ppo")
@dataclasses.dataclass
class ResidualPPOConfig(MethodConfig):
    residual_scale: float = 0.1  # ResiP: the correction is at most a small part of the normalized action range
    init_log_std: float = -1.0  # of the residual, in normalized units before residual_scale
    learn_log_std: bool = True  # False: a fixed exploration std
    value_lr: float = 1e-3  # the value's Adam learning rate (``lr`` is the actor's)
    n_epochs: int = 10  # passes over a round's transitions
    minibatch_size: int = 512
    clip_coef: float = 0.2
    gae_lambda: float = 0.95
    ent_coef: float = 0.0
    max_grad_norm: float = 0.5  # per network
    target_kl: float | None = None  # stop a round's epochs once approx_kl exceeds it (None: never)
    normalize_advantages: bool = True  # over the round's live transitions

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("residual_scale", "value_lr", "clip_coef", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("n_epochs", "minibatch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.gae_lambda <= 1:
            raise ValueError(f"gae_lambda must be in [0, 1], got {self.gae_lambda}")
        if self.ent_coef < 0:
            raise ValueError(f"ent_coef must be >= 0, got {self.ent_coef}")
        if self.target_kl is not None and not self.target_kl > 0:
            raise ValueError(f"target_kl must be null or > 0, got {self.target_kl}")

    def build(self, base: Policy, loop: EnvLoop, context: MethodContext) -> ResidualPPO:
        return ResidualPPO(self, base, loop, context)


class ResidualPPO(Method):
    config: ResidualPPOConfig
    adapter: ResidualPolicy

    def __init__(self, config: ResidualPPOConfig, base: Policy, loop: EnvLoop, context: MethodContext) -> None:
        super().__init__(config, base, loop, context)
        self.adapter = residual_adapter(
            base,
            self.device,
            residual_scale=config.residual_scale,
            hidden_dims=config.hidden_dims,
            init_log_std=config.init_log_std,
            learn_log_std=config.learn_log_std,
        )
        self.stepper = ResidualStepper(self.adapter, loop, self.device)
        self.value = MLP(self.adapter.input_dim, config.hidden_dims, 1).to(self.device)
        # eps 1e-5 as in CleanRL's PPO; a fixed log_std (requires_grad False) is not optimized.
        actor_params = [p for p in self.adapter.trainable_parameters() if p.requires_grad]
        self.actor_optimizer = torch.optim.Adam(actor_params, lr=config.lr, eps=1e-5)
        self.value_optimizer = torch.optim.Adam(self.value.parameters(), lr=config.value_lr, eps=1e-5)

    def policy(self, x: torch.Tensor) -> Normal:
        """The residual's distribution given ``x [N, F + Da]``: per-dim ``N(mu(x), exp(log_std)^2)``."""
        mean = self.adapter.actor(x)
        return Normal(mean, self.adapter.log_std.exp().expand_as(mean))

    def v(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., F + Da]`` -> ``V(x) [...]``."""
        return self.value(x).squeeze(-1)

    @torch.no_grad()
    def collect(self) -> dict[str, torch.Tensor]:
        """One round with the current stochastic policy; returns the live transitions, flat ``[N, ...]``: ``x``,
        ``residual``, ``log_prob``, ``values``, ``advantages``, ``returns``."""
        base_action, x = self.stepper.reset()
        xs, residuals, next_xs, decisions = [], [], [], []
        while not self.loop.round_over:
            residual = self.policy(x).sample()  # [B, Da]
            decision, base_action, next_x = self.stepper.step(base_action, residual)
            xs.append(x)
            residuals.append(residual)
            next_xs.append(next_x)
            decisions.append(decision)
            x = next_x

        def stacked(field: str) -> torch.Tensor:  # [T, B] from every decision's [B] (or [B, 1] rewards)
            values = np.stack([np.asarray(getattr(d, field)).reshape(self.loop.n_envs) for d in decisions])
            return torch.as_tensor(values, device=self.device)

        x, residual, next_x = torch.stack(xs), torch.stack(residuals), torch.stack(next_xs)  # [T, B, ...]
        values, next_values = self.v(x), self.v(next_x)
        terminated = stacked("terminated")
        advantages = compute_gae(
            stacked("rewards").float(),
            values,
            next_values,
            terminated,
            terminated | stacked("truncated"),
            self.config.gamma,
            self.config.gae_lambda,
        )
        live = stacked("live")
        return {
            "x": x[live],
            "residual": residual[live],
            "log_prob": self.policy(x[live]).log_prob(residual[live]).sum(-1),
            "values": values[live],
            "advantages": advantages[live],
            "returns": (advantages + values)[live],
        }

    def iterate(self) -> dict[str, float]:
        batch = self.collect()
        n = batch["x"].shape[0]
        advantages = batch["advantages"]
        if self.config.normalize_advantages:
            advantages = (advantages - advantages.mean()) / (advantages.std(correction=0) + 1e-8)
        n_minibatches = -(-n // self.config.minibatch_size)  # ceil: near-equal minibatches of at most that size
        history: dict[str, list[float]] = {
            k: [] for k in ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac")
        }
        for _ in range(self.config.n_epochs):
            for mb in torch.randperm(n, device=self.device).tensor_split(n_minibatches):
                dist = self.policy(batch["x"][mb])
                new_log_prob = dist.log_prob(batch["residual"][mb]).sum(-1)
                entropy = dist.entropy().sum(-1).mean()
                pg_loss, approx_kl, clipfrac = clipped_surrogate(
                    new_log_prob, batch["log_prob"][mb], advantages[mb], self.config.clip_coef
                )
                v_loss = 0.5 * (self.v(batch["x"][mb]) - batch["returns"][mb]).pow(2).mean()
                loss = pg_loss - self.config.ent_coef * entropy + v_loss  # disjoint parameters: each gets its own
                self.actor_optimizer.zero_grad()
                self.value_optimizer.zero_grad()
                loss.backward()
                for optimizer in (self.actor_optimizer, self.value_optimizer):
                    params = [p for group in optimizer.param_groups for p in group["params"]]
                    torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
                    optimizer.step()
                for key, value in zip(history, (pg_loss, v_loss, entropy, approx_kl, clipfrac), strict=True):
                    history[key].append(value.item())
            if self.config.target_kl is not None and history["approx_kl"][-1] > self.config.target_kl:
                break
        returns, values = batch["returns"], batch["values"]
        explained_variance = 1 - float((returns - values).var(correction=0) / returns.var(correction=0).clamp_min(1e-8))
        return {
            **{f"train/{k}": float(np.mean(v)) for k, v in history.items()},
            "train/explained_variance": explained_variance,
            "train/log_std": self.adapter.log_std.mean().item(),
            "train/transitions": float(n),
        }

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return pack_state({"value": self.value}, self.optimizers())

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        unpack_state(tensors, meta, {"value": self.value}, self.optimizers())

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor_optimizer": self.actor_optimizer, "value_optimizer": self.value_optimizer}
