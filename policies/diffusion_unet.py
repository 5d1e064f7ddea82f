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
from einops import rearrange

from policies.base import Policy, PolicyConfig
from policies.ddpm import DDPMConfig, DDPMPolicy
from policies.networks.unet1d import ConditionalUnet1D
from policies.registry import register_policy


@dataclasses.dataclass
class UnetBackboneConfig(PolicyConfig):
    """Diffusion Policy's 1-D UNet and its conditioning: the fields every UNet policy (diffusion, streaming, flow,
    MeanFlow, OFQL) shares. Not registered itself."""

    # 64/128/256 (4.5 M parameters) instead of the paper's 256/512/1024 (65 M) so that training fits a CPU budget;
    # the paper's size is one override away.
    down_dims: list[int] = dataclasses.field(default_factory=lambda: [64, 128, 256])
    diffusion_step_embed_dim: int = 128
    kernel_size: int = 5
    n_groups: int = 8
    cond_predict_scale: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        factor = 2 ** (len(self.down_dims) - 1)
        if self.horizon % factor:
            raise ValueError(
                f"horizon must be divisible by {factor} for down_dims {self.down_dims}, got {self.horizon}"
            )
        if any(d % self.n_groups for d in self.down_dims):
            raise ValueError(
                f"every down_dims entry must be divisible by n_groups={self.n_groups}, got {self.down_dims}"
            )


def build_unet(policy: Policy, config: UnetBackboneConfig, second_time_embed: bool = False) -> ConditionalUnet1D:
    """The UNet over ``[B, H, Da]`` actions, FiLM-conditioned on the flattened observation window
    ``[B, To * obs_feature_dim]`` (``encode_obs`` below)."""
    return ConditionalUnet1D(
        input_dim=policy.action_dim,
        global_cond_dim=policy.obs_feature_dim * config.n_obs_steps,
        diffusion_step_embed_dim=config.diffusion_step_embed_dim,
        down_dims=config.down_dims,
        kernel_size=config.kernel_size,
        n_groups=config.n_groups,
        cond_predict_scale=config.cond_predict_scale,
        second_time_embed=second_time_embed,
    )


def flat_obs_features(policy: Policy, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``obs: {k: [B, To, ...]}`` raw -> the UNet's conditioning ``[B, To * obs_feature_dim]``."""
    return rearrange(policy.obs_features(obs), "b t d -> b (t d)")


@register_policy("diffusion_unet")
@dataclasses.dataclass
class DiffusionUnetConfig(UnetBackboneConfig, DDPMConfig):
    def build(self, shape_meta: Mapping) -> DiffusionUnetPolicy:
        return DiffusionUnetPolicy(self, shape_meta)


class DiffusionUnetPolicy(DDPMPolicy):
    config: DiffusionUnetConfig

    def __init__(self, config: DiffusionUnetConfig, shape_meta: Mapping) -> None:
        super().__init__(config, shape_meta)
        self.model = build_unet(self, config)

    # -- pieces that outside samplers drive ------------------------------------------------------------------
    def encode_obs(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``obs: {k: [B, To, ...]}`` raw -> conditioning ``[B, To * obs_feature_dim]``."""
        return flat_obs_features(self, obs)

    def network(self, x_t: torch.Tensor, t: torch.Tensor, obs_features: torch.Tensor) -> torch.Tensor:
        """``x_t: [B, H, Da]`` normalized noisy actions at level ``t: [B]`` -> the network output ``[B, H, Da]``
        (epsilon or the clean chunk, by ``prediction_type``)."""
        return self.model(x_t, t, obs_features)
