"""Diffusion Policy with the 1-D temporal conditional UNet (Chi et al., RSS 2023).

Objective: epsilon prediction under a DDPM forward process (``policies.schedulers``: k=0 clean ... K-1
noisiest). Conditioning: the normalized observation window ``[B, To, Do]`` flattened into the UNet's FiLM
vector. Sampling: DDPM (ancestral) or DDIM (eta=0, deterministic given the initial noise), each over any
number of steps, both driven from outside through ``encode_obs`` + ``denoise`` so warm-started, streaming and
composed samplers can reuse the network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange

from policies.base import Policy, PolicyConfig
from policies.networks.unet1d import ConditionalUnet1D
from policies.registry import register_policy
from policies.schedulers import DDPMSchedule

SAMPLERS = ("ddpm", "ddim")


@register_policy("diffusion_unet")
@dataclasses.dataclass
class DiffusionUnetConfig(PolicyConfig):
    # Network. 64/128/256 (4.5 M parameters) instead of the paper's 256/512/1024 (65 M) so that training fits a
    # CPU budget; the paper's size is one override away.
    down_dims: list[int] = dataclasses.field(default_factory=lambda: [64, 128, 256])
    diffusion_step_embed_dim: int = 128
    kernel_size: int = 5
    n_groups: int = 8
    cond_predict_scale: bool = True
    # Objective and sampler.
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
        factor = 2 ** (len(self.down_dims) - 1)
        if self.horizon % factor:
            raise ValueError(
                f"horizon must be divisible by {factor} for down_dims {self.down_dims}, got {self.horizon}"
            )
        if any(d % self.n_groups for d in self.down_dims):
            raise ValueError(
                f"every down_dims entry must be divisible by n_groups={self.n_groups}, got {self.down_dims}"
            )

    def build(self, shape_meta: Mapping) -> DiffusionUnetPolicy:
        return DiffusionUnetPolicy(self, shape_meta)


class DiffusionUnetPolicy(Policy):
    config: DiffusionUnetConfig

    def __init__(self, config: DiffusionUnetConfig, shape_meta: Mapping) -> None:
        super().__init__(config, shape_meta)
        if self.image_keys:
            raise ValueError(
                f"diffusion_unet takes low-dimensional observations; got image keys {self.image_keys} "
                "(use task=pusht_state)"
            )
        obs_dim = sum(self.shape_meta["obs"][k][0] for k in self.lowdim_keys)
        self.model = ConditionalUnet1D(
            input_dim=self.action_dim,
            global_cond_dim=obs_dim * config.n_obs_steps,
            diffusion_step_embed_dim=config.diffusion_step_embed_dim,
            down_dims=config.down_dims,
            kernel_size=config.kernel_size,
            n_groups=config.n_groups,
            cond_predict_scale=config.cond_predict_scale,
        )
        self.schedule = DDPMSchedule(
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule=config.beta_schedule,
            clip_sample=config.clip_sample,
        )

    # -- pieces that outside samplers drive ------------------------------------------------------------------
    def encode_obs(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``obs: {k: [B, To, Dk]}`` raw -> conditioning ``[B, To * sum(Dk)]``."""
        x = torch.cat([self.normalizer.normalize(k, obs[k]) for k in self.lowdim_keys], dim=-1)
        return rearrange(x, "b t d -> b (t d)")

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, obs_features: torch.Tensor) -> torch.Tensor:
        """``x_t: [B, H, Da]`` normalized noisy actions at level ``t: [B]`` -> predicted epsilon ``[B, H, Da]``."""
        return self.model(x_t, t, obs_features)

    # -- contract --------------------------------------------------------------------------------------------
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
        shape = (b, self.config.horizon, self.action_dim)
        if noise is None:
            noise = torch.randn(shape, device=cond.device, generator=generator)
        else:
            self.check_noise(noise, b)
        # DDPM = ancestral posterior q(x_k' | x_k, x0_hat) between the listed levels, which is the DDIM update
        # with eta=1 (Song et al. 2021, eq. 16); with all K levels it is Ho et al.'s sampler.
        x0 = self.schedule.sample(
            lambda x, t: self.denoise(x, t, cond),
            noise.to(cond.device),
            self.schedule.timesteps(self.config.num_inference_steps),
            eta=1.0 if self.config.sampler == "ddpm" else 0.0,
            generator=generator,
        )
        return self.normalizer.unnormalize("action", x0)
