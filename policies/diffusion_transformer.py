"""Diffusion Policy with the time-series diffusion transformer (Chi et al., RSS 2023, sec. III-B).

Objective: epsilon prediction under a DDPM forward process (``policies.schedulers``: k=0 clean ... K-1
noisiest), exactly as ``diffusion_unet``. Conditioning: one token per observation step, ``[B, To, D_obs]``
(not flattened), cross-attended by the action tokens under DP's causal masks. Sampling: DDPM (ancestral) or
DDIM (eta=0, deterministic given the initial noise) over any number of trailing levels, driven from outside
through ``encode_obs`` + ``denoise`` like every generative policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from policies.ddpm import DDPMConfig, DDPMPolicy
from policies.networks.transformer import TransformerForDiffusion, check_transformer_args
from policies.registry import register_policy


@register_policy("diffusion_transformer")
@dataclasses.dataclass
class DiffusionTransformerConfig(DDPMConfig):
    # Network. DP's Push-T values are n_layer 8, n_head 4, n_emb 256, p_drop_attn 0.01 (9 M parameters; DP's
    # train_diffusion_transformer_lowdim_pusht_workspace.yaml; its image tasks use p_drop_attn 0.3). n_emb 128
    # (2.3 M) keeps DP's depth at about the CPU-sized UNet's cost per training step. p_drop_attn 0 because
    # dropout masks (six per layer) cost ~30 % of a CPU training step, for DP's nearly inactive 0.01.
    n_layer: int = 8
    n_head: int = 4
    n_emb: int = 128
    p_drop_emb: float = 0.0
    p_drop_attn: float = 0.0
    causal_attn: bool = True
    n_cond_layers: int = 0  # 0: per-token MLP over the conditioning tokens; > 0: a TransformerEncoder

    def __post_init__(self) -> None:
        super().__post_init__()
        check_transformer_args(
            self.n_layer, self.n_head, self.n_emb, self.p_drop_emb, self.p_drop_attn, self.n_cond_layers
        )

    def build(self, shape_meta: Mapping) -> DiffusionTransformerPolicy:
        return DiffusionTransformerPolicy(self, shape_meta)


class DiffusionTransformerPolicy(DDPMPolicy):
    config: DiffusionTransformerConfig

    def __init__(self, config: DiffusionTransformerConfig, shape_meta: Mapping) -> None:
        super().__init__(config, shape_meta)
        self.model = TransformerForDiffusion(
            input_dim=self.action_dim,
            output_dim=self.action_dim,
            horizon=config.horizon,
            n_obs_steps=config.n_obs_steps,
            cond_dim=self.obs_feature_dim,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_emb=config.n_emb,
            p_drop_emb=config.p_drop_emb,
            p_drop_attn=config.p_drop_attn,
            causal_attn=config.causal_attn,
            n_cond_layers=config.n_cond_layers,
        )

    # -- pieces that outside samplers drive ------------------------------------------------------------------
    def encode_obs(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``obs: {k: [B, To, ...]}`` raw -> conditioning tokens ``[B, To, obs_feature_dim]``."""
        return self.obs_features(obs)

    def network(self, x_t: torch.Tensor, t: torch.Tensor, obs_features: torch.Tensor) -> torch.Tensor:
        """``x_t: [B, H, Da]`` normalized noisy actions at level ``t: [B]`` (or an int), ``obs_features:
        [B, To, obs_feature_dim]`` -> the network output ``[B, H, Da]`` (epsilon or the clean chunk, by
        ``prediction_type``)."""
        return self.model(x_t, t, obs_features)
