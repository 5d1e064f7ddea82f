"""One-Step Flow Q-Learning (Nguyen & Yoo 2025, "One-Step Flow Q-Learning: Addressing the Diffusion Policy
Bottleneck in Offline Reinforcement Learning"): Diffusion Q-Learning (Wang et al. 2023) with the diffusion actor
replaced by a MeanFlow actor that samples in one step, so the Q-gradient flows through a single network call
instead of backpropagating through a denoising chain.

Time convention (``policies.flow``): t = 0 data, t = 1 noise; the actor is ``MeanFlowPolicy``, pi(s) =
eps - u(eps, 0, 1 | s), clipped to [-1, 1] in normalized action units.

Chunk-level offline RL. The critic scores a whole normalized action chunk [B, H, Da] (flattened) given the
flattened observation features [B, To * Do]. A training batch carries, besides obs/action:
    next_obs: {k: [B, To, ...]}  the observation window ending at the step after the last executed action;
    reward:   [B, Ta]  rewards of the executed actions chunk[:, To - 1 : To - 1 + Ta] (Ta = n_action_steps);
    terminal: [B, Ta]  1.0 where the state reached by that step is terminal.
TD target: R + gamma^Ta (1 - done) min_j Q_target_j(s', pi(s')), R = sum_i gamma^i r_i over the steps up to and
including the first terminal (later steps are padding), done = any terminal (Fujimoto et al. 2018's clipped
double Q, n-step return over the executed part of the chunk); with ``q_bounds`` clamped to the returns' range.
Losses (one optimizer, the shared Trainer): critic TD loss + flow loss - alpha Q(s, pi(s)), alpha = eta / E|Q|
(detached; DQL's / TD3+BC's normalization). The actor term uses detached critic parameters, so it sends no
gradient into the critic; the TD target comes from the target critics and the current actor under no_grad.
The critic reads detached observation features: with images, only the actor's losses train the encoder.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.func import functional_call

from policies.meanflow import MeanFlowConfig, MeanFlowPolicy
from policies.registry import register_policy

TRANSITION_KEYS = ("next_obs", "reward", "terminal")


@register_policy("ofql")
@dataclasses.dataclass
class OFQLConfig(MeanFlowConfig):
    needs_transitions: ClassVar[bool] = True
    discount: float = 0.99  # per environment step; a chunk of Ta executed steps bootstraps with discount ** Ta
    tau: float = 0.005  # Polyak rate of the target critics (TD3 / DQL)
    # Weight of the Q term relative to the flow (behaviour-cloning) loss, after dividing Q by E|Q| (DQL uses 1.0 on
    # D4RL locomotion, less on harder tasks). On Push-T's human demonstrations every larger weight lowered the
    # one-step score (10 minutes: eta 0.1 / 0.01 / 0.001 / 0 -> 0.13 / 0.16 / 0.55 / 0.66; 30 minutes: 0.1 -> 0.10,
    # 0.001 -> 0.95), and picking chunks by the trained critic lowered it too, so the default keeps the Q term a
    # small correction; raise it for data whose rewards the critic can rank (BENCHMARKS.md, OFQL).
    eta: float = 0.001
    critic_hidden_dims: list[int] = dataclasses.field(default_factory=lambda: [256, 256, 256])
    # LayerNorm after every hidden linear map of the critics (RLPD, Ball et al. 2023: keeps offline critics from
    # diverging on out-of-distribution actions). Off by default: DQL's critic has none.
    critic_layer_norm: bool = False
    # [lo, hi]: TD targets are clamped into it, the values a return can take (rewards in [r_lo, r_hi] give
    # [r_lo, r_hi] / (1 - discount)); null: unclamped, as DQL.
    q_bounds: list[float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.discount <= 1.0:
            raise ValueError(f"discount must be in [0, 1], got {self.discount}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if not self.critic_hidden_dims or min(self.critic_hidden_dims) < 1:
            raise ValueError(
                f"critic_hidden_dims must be a non-empty list of widths >= 1, got {self.critic_hidden_dims}"
            )
        if self.q_bounds is not None and (len(self.q_bounds) != 2 or not self.q_bounds[0] < self.q_bounds[1]):
            raise ValueError(f"q_bounds must be null or [lo, hi] with lo < hi, got {self.q_bounds}")

    def build(self, shape_meta: Mapping) -> OFQLPolicy:
        return OFQLPolicy(self, shape_meta)


class QNetwork(nn.Module):
    """Q(s, a): MLP with Mish activations, as DQL's critic (``layer_norm``: LayerNorm before each activation).
    obs: [B, obs_dim], action: [B, action_dim] -> [B]."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims: Sequence[int], layer_norm: bool = False) -> None:
        super().__init__()
        dims = [obs_dim + action_dim, *hidden_dims]
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(d_in, d_out), *([nn.LayerNorm(d_out)] if layer_norm else []), nn.Mish()]
        self.net = nn.Sequential(*layers, nn.Linear(dims[-1], 1))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, action], dim=-1)).squeeze(-1)


def chunk_td_target(
    reward: torch.Tensor, terminal: torch.Tensor, next_q: torch.Tensor, discount: float
) -> torch.Tensor:
    """reward, terminal: [B, Ta]; next_q: [B] = min_j Q_target_j(s', pi(s')) -> TD target [B].
    R = sum_i gamma^i r_i over steps i up to and including the first terminal; (1 - done) cuts the bootstrap."""
    alive = torch.cumprod(1 - terminal, dim=1)  # [B, Ta]: 1 while no terminal up to and including step i
    counted = torch.cat([torch.ones_like(alive[:, :1]), alive[:, :-1]], dim=1)  # no terminal before step i
    powers = discount ** torch.arange(reward.shape[1], device=reward.device, dtype=reward.dtype)
    ret = (counted * powers * reward).sum(dim=1)
    return ret + discount ** reward.shape[1] * alive[:, -1] * next_q


class OFQLPolicy(MeanFlowPolicy):
    config: OFQLConfig

    def __init__(self, config: OFQLConfig, shape_meta: Mapping) -> None:
        super().__init__(config, shape_meta)
        obs_dim = self.obs_feature_dim * config.n_obs_steps
        action_dim = config.horizon * self.action_dim
        self.qf1 = QNetwork(obs_dim, action_dim, config.critic_hidden_dims, config.critic_layer_norm)
        self.qf2 = QNetwork(obs_dim, action_dim, config.critic_hidden_dims, config.critic_layer_norm)
        # Target critics: submodules (saved in checkpoints, moved by .to()) that no optimizer updates.
        self.qf1_target = copy.deepcopy(self.qf1).requires_grad_(False)
        self.qf2_target = copy.deepcopy(self.qf2).requires_grad_(False)

    def check_batch(self, batch: Mapping) -> int:
        missing = [k for k in TRANSITION_KEYS if k not in batch]
        if missing:
            raise ValueError(
                f"ofql needs transitions: the batch lacks {missing}. Besides 'obs' and 'action' it reads "
                "'next_obs' {k: [B, To, ...]}, 'reward' [B, Ta] and 'terminal' [B, Ta] (Ta = n_action_steps), "
                "which the task's dataset adds when the policy config sets needs_transitions"
            )
        b = super().check_batch(batch)
        try:
            nb = self.check_obs(batch["next_obs"])
        except ValueError as err:
            raise ValueError(f"batch 'next_obs': {err}") from err
        if nb != b:
            raise ValueError(f"batch 'next_obs' has batch size {nb}, expected {b}")
        for key in ("reward", "terminal"):
            x, want = batch[key], [b, self.config.n_action_steps]
            if list(x.shape) != want:
                raise ValueError(f"batch '{key}' has shape {list(x.shape)}, expected {want} [B, n_action_steps]")
            if not torch.isfinite(x).all():
                raise ValueError(f"batch '{key}' contains NaN or inf")
        return b

    def grad_clip_groups(self) -> list[list[nn.Parameter]]:
        """Actor (everything but the critics) and critics clipped separately, as DQL's two optimizers are: with
        one global clip the critics' TD gradients (norms of 10-130 on Push-T) set the actor's clip factor at every
        step (BENCHMARKS.md, OFQL)."""
        critics = [*self.qf1.parameters(), *self.qf2.parameters()]
        ids = {id(p) for p in critics}
        return [[p for p in self.parameters() if id(p) not in ids], critics]

    @staticmethod
    def _flat(action: torch.Tensor) -> torch.Tensor:
        return rearrange(action, "b h d -> b (h d)")

    @torch.no_grad()
    def td_target(
        self, next_obs: Mapping[str, torch.Tensor], reward: torch.Tensor, terminal: torch.Tensor
    ) -> torch.Tensor:
        """-> [B]: chunk-level TD target from the target critics and the current actor's pi(s')."""
        next_cond = self.encode_obs(next_obs)
        noise = torch.randn(next_cond.shape[0], self.config.horizon, self.action_dim, device=next_cond.device)
        next_action = self._flat(self.sample_normalized(next_cond, noise))
        next_q = torch.minimum(self.qf1_target(next_cond, next_action), self.qf2_target(next_cond, next_action))
        target = chunk_td_target(reward, terminal, next_q, self.config.discount)
        return target if self.config.q_bounds is None else target.clamp(*self.config.q_bounds)

    def actor_q(self, cond: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """min_j Q_j(s, a) [B] through DETACHED critic parameters: gradients reach ``action`` (the actor), never
        the critics. cond: [B, To * Do]; action: [B, H, Da] normalized."""
        qs = [
            functional_call(qf, {k: v.detach() for k, v in qf.named_parameters()}, (cond, self._flat(action)))
            for qf in (self.qf1, self.qf2)
        ]
        return torch.minimum(*qs)

    def compute_loss(self, batch: Mapping) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_batch(batch)
        cond = self.encode_obs(batch["obs"])  # [B, To * Do]
        action = self.normalizer.normalize("action", batch["action"])  # [B, H, Da]
        flow_loss, flow_logs = self.flow_loss(cond, action)

        # Critic: TD regression of both heads on the data chunk.
        target = self.td_target(batch["next_obs"], batch["reward"], batch["terminal"])  # [B]
        obs_q, data_action = cond.detach(), self._flat(action)
        critic_loss = F.mse_loss(self.qf1(obs_q, data_action), target) + F.mse_loss(
            self.qf2(obs_q, data_action), target
        )

        # Actor: behaviour cloning (MeanFlow loss) + normalized Q of the one-step action (DQL eq. 4, OFQL).
        q_pi = self.actor_q(obs_q, self.sample_normalized(cond, torch.randn_like(action)))  # [B]
        alpha = self.config.eta / q_pi.abs().mean().detach().clamp(min=1e-6)
        actor_loss = flow_loss - alpha * q_pi.mean()

        loss = critic_loss + actor_loss
        logs = {
            "loss": loss.detach(),
            "flow_loss": flow_loss.detach(),
            "flow_mse": flow_logs["flow_mse"],
            "critic_loss": critic_loss.detach(),
            "q_pi": q_pi.mean().detach(),
            "td_target": target.mean(),
            "alpha": alpha,
        }
        return loss, logs

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Polyak averaging: target <- (1 - tau) target + tau online (Lillicrap et al. 2016)."""
        for online, target in ((self.qf1, self.qf1_target), (self.qf2, self.qf2_target)):
            torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), self.config.tau)
