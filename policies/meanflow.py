"""MeanFlow policy: one-step action chunks from an average-velocity UNet (Geng et al. 2025, "Mean Flows for
One-step Generative Modeling").

Time convention (``policies.flow``): t = 0 data, t = 1 noise, z_t = (1 - t) a + t eps, v = eps - a. The network
predicts the average velocity u(z_t, r, t) over [r, t] (r <= t), so z_r = z_t - (t - r) u. It is the 1-D UNet
with a second time embedding: step embedding of t plus a second one of (t - r) (the paper's best input pair).
Objective: u regressed on u_tgt = v - (t - r) (v . d_z u + d_t u), stop-gradient on the target, the total
derivative from one torch.func.jvp (on the r < t samples only, outside autograd); r = t (plain flow matching) for
1 - ratio_r_neq_t of the samples.
Sampling: a = eps - u(eps, 0, 1) (one network call), or num_inference_steps steps of z_r = z_t - (t - r) u.

OFQL reuses ``flow_loss(cond, action)`` and the differentiable ``sample_normalized(cond, noise)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from policies import flow
from policies.flow_unet import UnetFlowConfig, UnetFlowPolicy
from policies.registry import register_policy


@register_policy("meanflow")
@dataclasses.dataclass
class MeanFlowConfig(UnetFlowConfig):
    # Paper defaults (Geng et al. 2025, Table 1 / sec. 4.3): r != t for 25 % of the samples (r = t, i.e. flow
    # matching, for the other 75 %); one-step sampling. Their (r, t) come from logit-normal(-0.4, 1.0); uniform
    # time is the default here: with it the one-step Push-T score at 10 minutes rose from 0.60-0.71 to 0.82-0.90
    # (three sampling seeds each, BENCHMARKS.md).
    time_distribution: str = "uniform"
    # A narrower UNet than Diffusion Policy's 64/128/256 (2.9 M parameters instead of 4.7 M): a one-step chunk is
    # then 12.4-13.5x faster than DP-UNet's DDIM-10 chunk instead of 9.3x (torch, batch 1), at a mean 30-minute
    # Push-T score 0.009 lower (five narrow runs against three full-width ones, inside the run-to-run spread;
    # BENCHMARKS.md, "One-step policies on a narrower UNet").
    down_dims: list[int] = dataclasses.field(default_factory=lambda: [48, 96, 192])
    logit_normal_mean: float = -0.4
    logit_normal_std: float = 1.0
    num_inference_steps: int = 1
    ratio_r_neq_t: float = 0.25
    # 0: plain MSE. p > 0: the paper's adaptive loss weight 1 / (||delta||^2 + 1e-3)^p (p = 1 on ImageNet). Default
    # p = 1: on Push-T at 10 minutes plain MSE gave one-step score 0.281, p = 1 gave 0.708 (BENCHMARKS.md).
    adaptive_weight_power: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.ratio_r_neq_t <= 1.0:
            raise ValueError(f"ratio_r_neq_t must be in [0, 1], got {self.ratio_r_neq_t}")
        if self.adaptive_weight_power < 0:
            raise ValueError(f"adaptive_weight_power must be >= 0, got {self.adaptive_weight_power}")

    def build(self, shape_meta: Mapping) -> MeanFlowPolicy:
        return MeanFlowPolicy(self, shape_meta)


class MeanFlowPolicy(UnetFlowPolicy):
    config: MeanFlowConfig
    second_time_embed = True

    def average_velocity(
        self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, obs_features: torch.Tensor
    ) -> torch.Tensor:
        """u(z_t, r, t): z ``[B, H, Da]`` normalized, r <= t ``[B]`` in [0, 1], obs_features ``[B, To * Do]``
        -> ``[B, H, Da]``. Differentiable in (z, r, t) (the jvp of the objective goes through it)."""
        s = self.config.time_scale
        return self.model(z, t * s, obs_features, timestep2=(t - r) * s)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, obs_features: torch.Tensor) -> torch.Tensor:
        """Instantaneous velocity v(x_t, t) = u(x_t, t, t) ``[B, H, Da]``, for outside ODE samplers."""
        return self.average_velocity(x_t, t, t, obs_features)

    def flow_loss(self, cond: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        eps = torch.randn_like(action)
        r, t = flow.sample_r_t(
            action.shape[0],
            c.time_distribution,
            c.ratio_r_neq_t,
            mean=c.logit_normal_mean,
            std=c.logit_normal_std,
            device=action.device,
        )
        u, u_tgt = flow.meanflow_target(
            self.average_velocity, flow.interpolate(action, eps, t), r, t, eps - action, cond
        )
        loss = flow.meanflow_loss(u, u_tgt, c.adaptive_weight_power)
        # The unweighted squared error too: with the adaptive weight (p = 1) the loss itself stays near 1.
        mse = (u - u_tgt).detach().pow(2).mean()
        return loss, {"loss": loss.detach(), "flow_loss": loss.detach(), "flow_mse": mse}

    def sample_normalized(self, cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        grid = flow.time_grid(self.config.num_inference_steps, noise.device)
        z = flow.meanflow_sample(lambda z, r, t: self.average_velocity(z, r, t, cond), noise, grid)
        return self.clip(z)
