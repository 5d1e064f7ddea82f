"""The DDPM objective and DDPM/DDIM samplers shared by the Diffusion Policy networks (UNet, transformer).

Time convention (``policies.schedulers``): DDPM levels k = 0 (clean) .. K-1 (noisiest). The network predicts
epsilon (``prediction_type="epsilon"``, the default) or the clean sample (``"sample"``, DP's other choice); either
way ``denoise`` returns epsilon, so samplers, composition and RL code see one convention. A subclass builds its
network and defines ``encode_obs`` and ``network``; everything here is written only against those two, the
schedule and the config's sampler fields.

Warm start (``refine_action_chunk``, RTI-DP, Duan et al. 2025): a clean chunk is diffused to the intermediate
level start_t = round(start * (K - 1)) by q(x_k | x_0) and denoised from there over ``schedule.timesteps(n,
start_t)`` with the policy's own sampler; at start = 1 (level K-1) the chunk is replaced by the noise itself, as
full sampling treats pure noise as level K-1, so refine(start=1) == predict_action_chunk for the same noise.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from policies.base import Policy, PolicyConfig
from policies.schedulers import DDPMSchedule

SAMPLERS = ("ddpm", "ddim")
PREDICTION_TYPES = ("epsilon", "sample")


@dataclasses.dataclass
class DDPMConfig(PolicyConfig):
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True
    sampler: str = "ddim"
    num_inference_steps: int = 10
    # what the network regresses: "epsilon" (DP's default) or "sample" (the clean chunk, DP's other option)
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got '{self.sampler}'")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got '{self.prediction_type}'")
        if not 1 <= self.num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be in [1, num_train_timesteps={self.num_train_timesteps}], "
                f"got {self.num_inference_steps}"
            )


class DDPMPolicy(Policy):
    config: DDPMConfig

    def __init__(self, config: DDPMConfig, shape_meta: Mapping) -> None:
        super().__init__(config, shape_meta)
        self.schedule = DDPMSchedule(
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule=config.beta_schedule,
            clip_sample=config.clip_sample,
            # dims scaled by action_scale span [-s, s]; the schedule's clip is one number, so the widest span
            clip_sample_range=max(config.action_scale or [1.0]),
        )

    @abc.abstractmethod
    def encode_obs(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``obs: {k: [B, To, ...]}`` raw -> the network's conditioning (its shape is the network's business)."""

    @abc.abstractmethod
    def network(self, x_t: torch.Tensor, t: torch.Tensor, obs_features: torch.Tensor) -> torch.Tensor:
        """``x_t: [B, H, Da]`` normalized noisy actions at level ``t: [B]`` -> the network's raw output ``[B, H,
        Da]``: epsilon or the clean chunk, by ``config.prediction_type``."""

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, obs_features: torch.Tensor) -> torch.Tensor:
        """``x_t: [B, H, Da]`` normalized noisy actions at level ``t: [B]`` -> predicted epsilon ``[B, H, Da]``
        (a clean-sample prediction x0 is turned into eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t))."""
        out = self.network(x_t, t, obs_features)
        if self.config.prediction_type == "epsilon":
            return out
        return self.schedule.epsilon_from_x0(x_t, out, t)

    def compute_loss(self, batch: Mapping) -> tuple[torch.Tensor, dict[str, float]]:
        b = self.check_batch(batch)
        cond = self.encode_obs(batch["obs"])
        action = self.normalizer.normalize("action", batch["action"])  # [B, H, Da]
        noise = torch.randn_like(action)
        t = torch.randint(0, self.config.num_train_timesteps, (b,), device=action.device)
        pred = self.network(self.schedule.add_noise(action, noise, t), t, cond)
        loss = F.mse_loss(pred, noise if self.config.prediction_type == "epsilon" else action)
        return loss, {"loss": loss.detach()}

    def sample_with(
        self,
        eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x_init: torch.Tensor,
        start_t: int,
        num_steps: int,
        generator: torch.Generator | None,
        sampler: str | None = None,
    ) -> torch.Tensor:
        """``x_init: [B, H, Da]`` normalized at level ``start_t`` -> clean normalized actions ``[B, H, Da]``, every
        step driven by ``eps_fn(x_t, t) -> epsilon`` (this policy's network, or a test-time composition of several
        networks on this schedule, ``deploy.compose``). ``sampler``: "ddpm" or "ddim" (None: the config's).

        DDPM = ancestral posterior q(x_k' | x_k, x0_hat) between the listed levels, which is the DDIM update with
        eta=1 (Song et al. 2021, eq. 16); with all K levels it is Ho et al.'s sampler."""
        sampler = sampler or self.config.sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        x0 = self.schedule.sample(
            eps_fn,
            x_init,
            self.schedule.timesteps(num_steps, start_t),
            eta=1.0 if sampler == "ddpm" else 0.0,
            generator=generator,
        )
        if self.config.clip_sample and self.config.action_scale is not None:
            # the schedule clips to one number (the widest span); each dim's own range is [-s, s]
            bound = torch.as_tensor(self.config.action_scale, dtype=x0.dtype, device=x0.device)
            x0 = torch.maximum(torch.minimum(x0, bound), -bound)
        return x0

    def _sample(
        self, cond: torch.Tensor, x_init: torch.Tensor, start_t: int, num_steps: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """``sample_with`` driven by this policy's own denoiser under conditioning ``cond``."""
        return self.sample_with(lambda x, t: self.denoise(x, t, cond), x_init, start_t, num_steps, generator)

    @torch.no_grad()
    def predict_action_chunk(
        self,
        obs: Mapping[str, torch.Tensor],
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``obs: {k: [B, To, Dk]}`` -> actions ``[B, H, Da]`` in raw units.

        With ``sampler="ddim"`` the result is a deterministic function of ``noise`` (eta=0). DDPM's ancestral
        steps draw fresh noise; pass ``generator`` to make them reproducible.
        """
        b = self.check_obs(obs)
        cond = self.encode_obs(obs)
        noise = self.initial_noise(b, noise, cond.device, generator)
        x0 = self._sample(cond, noise, self.config.num_train_timesteps - 1, self.config.num_inference_steps, generator)
        return self.normalizer.unnormalize("action", x0)

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
        """Warm-started sampling: ``obs: {k: [B, To, Dk]}``, ``actions: [B, H, Da]`` raw (e.g. the previous chunk,
        shifted) -> refined actions ``[B, H, Da]`` raw, after ``num_steps`` denoiser passes from level
        round(start * (K - 1)). ``noise [B, H, Da]`` diffuses ``actions`` to that level (drawn when None)."""
        b = self.check_obs(obs)
        self.check_noise(actions, b, name="actions")
        if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0 <= start <= 1:
            raise ValueError(f"start must be a float in [0, 1], got {start!r}")
        cond = self.encode_obs(obs)
        noise = self.initial_noise(b, noise, cond.device, generator)
        top = self.config.num_train_timesteps - 1
        start_t = round(start * top)
        x0 = self.normalizer.normalize("action", actions.to(cond.device))
        x = noise if start_t == top else self.schedule.add_noise(x0, noise, start_t)
        return self.normalizer.unnormalize("action", self._sample(cond, x, start_t, num_steps, generator))
