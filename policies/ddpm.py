"""The DDPM epsilon objective and DDPM/DDIM samplers shared by the Diffusion Policy networks (UNet, transformer).

Time convention (``policies.schedulers``): DDPM levels k = 0 (clean) .. K-1 (noisiest); the network predicts
epsilon. A subclass builds its network and defines ``encode_obs`` and ``denoise``; everything here is written
only against those two, the schedule and the config's sampler fields.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from policies.base import Policy, PolicyConfig
from policies.schedulers import DDPMSchedule

SAMPLERS = ("ddpm", "ddim")


@dataclasses.dataclass
class DDPMConfig(PolicyConfig):
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True
    sampler: str = "ddim"
    num_inference_steps: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got '{self.sampler}'")
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
        )

    @abc.abstractmethod
    def encode_obs(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``obs: {k: [B, To, ...]}`` raw -> the network's conditioning (its shape is the network's business)."""

    @abc.abstractmethod
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, obs_features: torch.Tensor) -> torch.Tensor:
        """``x_t: [B, H, Da]`` normalized noisy actions at level ``t: [B]`` -> predicted epsilon ``[B, H, Da]``."""

    def compute_loss(self, batch: Mapping) -> tuple[torch.Tensor, dict[str, float]]:
        b = self.check_batch(batch)
        cond = self.encode_obs(batch["obs"])
        action = self.normalizer.normalize("action", batch["action"])  # [B, H, Da]
        noise = torch.randn_like(action)
        t = torch.randint(0, self.config.num_train_timesteps, (b,), device=action.device)
        pred = self.denoise(self.schedule.add_noise(action, noise, t), t, cond)
        loss = F.mse_loss(pred, noise)
        return loss, {"loss": loss.detach()}

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
        # DDPM = ancestral posterior q(x_k' | x_k, x0_hat) between the listed levels, which is the DDIM update
        # with eta=1 (Song et al. 2021, eq. 16); with all K levels it is Ho et al.'s sampler.
        x0 = self.schedule.sample(
            lambda x, t: self.denoise(x, t, cond),
            noise,
            self.schedule.timesteps(self.config.num_inference_steps),
            eta=1.0 if self.config.sampler == "ddpm" else 0.0,
            generator=generator,
        )
        return self.normalizer.unnormalize("action", x0)
