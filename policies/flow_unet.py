"""Rectified-flow policy on Diffusion Policy's 1-D conditional UNet (Liu et al. 2023; Lipman et al. 2023).

Time convention (``policies.flow``): t = 0 data, t = 1 noise, x_t = (1 - t) a + t eps, the network predicts the
velocity v = eps - a. Objective: MSE(v_pred(x_t, t), eps - a) with t uniform or logit-normal. Sampling: Euler or
midpoint ODE steps from t = 1 (x = the injected noise) to t = 0, deterministic given the noise. Conditioning is
diffusion_unet's: the normalized observation window [B, To, Do] flattened into the UNet's FiLM vector.

``UnetFlowConfig`` / ``UnetFlowPolicy`` hold what flow_unet, meanflow and ofql share (the UNet, conditioning,
time sampling, the predict/loss plumbing); each subclass supplies ``flow_loss`` and ``sample_normalized``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F

from policies import flow
from policies.base import Policy
from policies.diffusion_unet import UnetBackboneConfig, build_unet, flat_obs_features
from policies.registry import register_policy


@dataclasses.dataclass
class UnetFlowConfig(UnetBackboneConfig):
    """Fields of every flow policy on diffusion_unet's 1-D UNet (not registered itself)."""

    # The UNet's sinusoidal step embedding (frequencies 1 .. 1e-4 rad per unit) was made for integer DDPM levels;
    # fed t in [0, 1] directly every feature would be nearly linear in t. t * 100 puts flow time on exactly the
    # range of diffusion_unet's levels k = 0..99 (t = k / K), so t = 0.01 apart embeds like adjacent DDPM levels.
    # (SD3 uses t * 1000; the smaller scale keeps u smooth in t, which MeanFlow's d/dt target needs.)
    time_scale: float = 100.0
    time_distribution: str = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    num_inference_steps: int = 10
    clip_sample: bool = True  # clip the final normalized sample to [-1, 1] (the normalizer's range)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.time_distribution not in flow.TIME_DISTRIBUTIONS:
            raise ValueError(
                f"time_distribution must be one of {flow.TIME_DISTRIBUTIONS}, got '{self.time_distribution}'"
            )
        if self.logit_normal_std <= 0:
            raise ValueError(f"logit_normal_std must be > 0, got {self.logit_normal_std}")
        if self.time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")


class UnetFlowPolicy(Policy):
    """The UNet, conditioning and contract plumbing shared by the flow policies."""

    config: UnetFlowConfig
    second_time_embed: ClassVar[bool] = False  # MeanFlow's u(z, r, t) embeds a second time

    def __init__(self, config: UnetFlowConfig, shape_meta: Mapping) -> None:
        super().__init__(config, shape_meta)
        self.model = build_unet(self, config, second_time_embed=self.second_time_embed)

    def encode_obs(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``obs: {k: [B, To, ...]}`` raw -> conditioning ``[B, To * obs_feature_dim]``."""
        return flat_obs_features(self, obs)

    def sample_time(self, n: int, device: torch.device) -> torch.Tensor:
        """n training times [n] from the configured distribution."""
        c = self.config
        return flow.sample_time(n, c.time_distribution, mean=c.logit_normal_mean, std=c.logit_normal_std, device=device)

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        """Clip normalized actions ``[B, H, Da]`` to the normalizer's range: [-1, 1], or [-s, s] for a dim scaled
        by ``action_scale``."""
        if not self.config.clip_sample:
            return x
        if self.config.action_scale is None:
            return x.clamp(-1.0, 1.0)
        bound = torch.as_tensor(self.config.action_scale, dtype=x.dtype, device=x.device)
        return torch.maximum(torch.minimum(x, bound), -bound)

    @abc.abstractmethod
    def flow_loss(self, cond: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """cond: [B, To * Do]; action: [B, H, Da] normalized -> (loss, logs)."""

    @abc.abstractmethod
    def sample_normalized(self, cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """cond: [B, To * Do]; noise: [B, H, Da] (the sample at t = 1) -> normalized actions [B, H, Da].
        Differentiable (no torch.no_grad inside), so actor losses can backpropagate through sampling."""

    # -- contract --------------------------------------------------------------------------------------------
    def compute_loss(self, batch: Mapping) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_batch(batch)
        return self.flow_loss(self.encode_obs(batch["obs"]), self.normalizer.normalize("action", batch["action"]))

    @torch.no_grad()
    def predict_action_chunk(
        self,
        obs: Mapping[str, torch.Tensor],
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``obs: {k: [B, To, Dk]}`` -> actions ``[B, H, Da]`` in raw units; a deterministic function of ``noise``
        (drawn from ``generator`` when not given)."""
        b = self.check_obs(obs)
        cond = self.encode_obs(obs)
        noise = self.initial_noise(b, noise, cond.device, generator)
        return self.normalizer.unnormalize("action", self.sample_normalized(cond, noise))


@register_policy("flow_unet")
@dataclasses.dataclass
class FlowUnetConfig(UnetFlowConfig):
    sampler: str = "euler"  # "midpoint": second order, two network calls per step

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampler not in flow.SAMPLERS:
            raise ValueError(f"sampler must be one of {flow.SAMPLERS}, got '{self.sampler}'")

    def build(self, shape_meta: Mapping) -> FlowUnetPolicy:
        return FlowUnetPolicy(self, shape_meta)


class FlowUnetPolicy(UnetFlowPolicy):
    config: FlowUnetConfig

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, obs_features: torch.Tensor) -> torch.Tensor:
        """``x_t: [B, H, Da]`` normalized at flow time ``t: [B]`` (or [B, H]) in [0, 1] -> velocity ``[B, H, Da]``."""
        return self.model(x_t, t * self.config.time_scale, obs_features)

    def flow_loss(self, cond: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        eps = torch.randn_like(action)
        t = self.sample_time(action.shape[0], action.device)
        loss = F.mse_loss(self.denoise(flow.interpolate(action, eps, t), t, cond), eps - action)
        return loss, {"loss": loss.detach()}

    def sample_normalized(self, cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._integrate(cond, noise, 1.0, self.config.num_inference_steps)

    def _integrate(self, cond: torch.Tensor, x_t: torch.Tensor, start: float, num_steps: int) -> torch.Tensor:
        """``x_t: [B, H, Da]`` normalized at flow time ``start`` -> ``num_steps`` ODE steps to t = 0 -> [B, H, Da]."""
        return self.integrate_with(lambda x, t: self.denoise(x, t, cond), x_t, start, num_steps)

    def integrate_with(
        self,
        velocity_fn: flow.VelocityFn,
        x_t: torch.Tensor,
        start: float,
        num_steps: int,
        sampler: str | None = None,
    ) -> torch.Tensor:
        """``_integrate`` driven by any ``velocity_fn(x_t, t)`` on this policy's flow path (its own network, or a
        test-time composition of several, ``deploy.compose``); ``sampler`` None: the config's."""
        grid = flow.time_grid(num_steps, x_t.device, start=start)
        return self.clip(flow.integrate(velocity_fn, x_t, grid, sampler or self.config.sampler))

    @torch.no_grad()
    def refine_action_chunk(
        self,
        obs: Mapping[str, torch.Tensor],
        actions: torch.Tensor,
        num_steps: int,
        start: float,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Warm-started sampling (RTI-DP, Duan et al. 2025): ``actions: [B, H, Da]`` raw (e.g. the previous chunk,
        shifted) are moved to x_t = (1 - t) a + t eps at t = ``start`` in (0, 1], then integrated to t = 0 in
        ``num_steps`` steps under ``obs: {k: [B, To, Dk]}`` -> ``[B, H, Da]`` raw. At start = 1, x_1 = eps and this
        is predict_action_chunk with ``num_steps`` steps."""
        b = self.check_obs(obs)
        self.check_noise(actions, b, name="actions")
        if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0 < start <= 1:
            raise ValueError(f"start must be a float in (0, 1], got {start!r}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        cond = self.encode_obs(obs)
        noise = self.initial_noise(b, noise, cond.device, generator)
        a = self.normalizer.normalize("action", actions.to(cond.device))
        x_t = flow.interpolate(a, noise, torch.full((b,), float(start), device=cond.device))
        return self.normalizer.unnormalize("action", self._integrate(cond, x_t, float(start), num_steps))
