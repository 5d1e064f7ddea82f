"""Diffusion Policy's time-series diffusion transformer (Chi et al. 2023, "Diffusion Policy", sec. III-B,
"TransformerForDiffusion"): a minGPT-style decoder over the noisy action tokens that cross-attends to
conditioning tokens = [diffusion-step token, one token per observation step].

    actions [B, H, Da] -> Linear + learned pos. emb. ---------------------------> decoder (n_layer) -> LN -> Linear
    cond: [sinusoid(k)] ++ Linear(obs [B, To, D_obs]) + learned pos. emb. -> encoder --^ (cross-attention memory)

Timesteps are the DDPM levels of policies/schedulers.py (k=0 clean .. K-1 noisiest); the head predicts epsilon.
With ``causal_attn`` action token i attends to action tokens <= i and to the step token and observation tokens
j <= i (DP's ``causal_attn=True, obs_as_cond=True`` masks), so an action never looks at observations that
follow it in the window; without it every token attends everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from policies.networks.unet1d import SinusoidalPosEmb


def check_transformer_args(
    n_layer: int, n_head: int, n_emb: int, p_drop_emb: float, p_drop_attn: float, n_cond_layers: int
) -> None:
    """Raise ``ValueError`` naming the first bad architecture argument (shared by the network and the policy
    config, so a bad config fails when it is built, not when the network is)."""
    for name, value, lowest in (("n_layer", n_layer, 1), ("n_head", n_head, 1), ("n_cond_layers", n_cond_layers, 0)):
        if value < lowest:
            raise ValueError(f"{name} must be >= {lowest}, got {value}")
    # SinusoidalPosEmb needs an even width with at least two frequencies
    if n_emb < 4 or n_emb % 2:
        raise ValueError(f"n_emb must be even and >= 4, got {n_emb}")
    if n_emb % n_head:
        raise ValueError(f"n_emb must be divisible by n_head={n_head}, got {n_emb}")
    for name, p in (("p_drop_emb", p_drop_emb), ("p_drop_attn", p_drop_attn)):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {p}")


def _additive_mask(allowed: Tensor) -> Tensor:
    """Boolean "may attend" [L, S] -> the float mask nn.Transformer adds to attention logits (0 or -inf)."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


class TransformerForDiffusion(nn.Module):
    """sample: [B, horizon, input_dim], timestep: int | [B], cond: [B, n_obs_steps, cond_dim]
    -> [B, horizon, output_dim]."""

    tgt_mask: Tensor | None  # [H, H]
    memory_mask: Tensor | None  # [H, 1 + To]

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        horizon: int,
        n_obs_steps: int,
        cond_dim: int,
        n_layer: int = 8,
        n_head: int = 4,
        n_emb: int = 256,
        p_drop_emb: float = 0.0,
        p_drop_attn: float = 0.3,
        causal_attn: bool = True,
        n_cond_layers: int = 0,
    ) -> None:
        super().__init__()
        sizes = (("input_dim", input_dim), ("output_dim", output_dim), ("horizon", horizon))
        for name, value in (*sizes, ("n_obs_steps", n_obs_steps), ("cond_dim", cond_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        check_transformer_args(n_layer, n_head, n_emb, p_drop_emb, p_drop_attn, n_cond_layers)
        self.input_dim, self.horizon, self.n_obs_steps, self.cond_dim = input_dim, horizon, n_obs_steps, cond_dim

        # action tokens
        self.input_emb = nn.Linear(input_dim, n_emb)
        self.pos_emb = nn.Parameter(torch.zeros(1, horizon, n_emb))
        self.drop = nn.Dropout(p_drop_emb)
        # conditioning tokens: the step token first, then one token per observation step; one learned
        # positional embedding over all 1 + To of them (as in DP)
        self.time_emb = SinusoidalPosEmb(n_emb)
        self.cond_obs_emb = nn.Linear(cond_dim, n_emb)
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, 1 + n_obs_steps, n_emb))

        def layer_args() -> dict:
            # pre-norm ("important for stability", DP), GELU, 4x feed-forward as in GPT-2
            return dict(
                d_model=n_emb,
                nhead=n_head,
                dim_feedforward=4 * n_emb,
                dropout=p_drop_attn,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )

        if n_cond_layers > 0:
            self.encoder: nn.Module = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(**layer_args()), n_cond_layers, enable_nested_tensor=False
            )
        else:  # DP's default: a per-token MLP over the conditioning tokens
            self.encoder = nn.Sequential(nn.Linear(n_emb, 4 * n_emb), nn.Mish(), nn.Linear(4 * n_emb, n_emb))
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer_args()), n_layer)
        self.ln_f = nn.LayerNorm(n_emb)
        self.head = nn.Linear(n_emb, output_dim)

        if causal_attn:
            i = torch.arange(horizon)[:, None]  # action (query) index
            # memory index s: 0 = step token (always visible), s = j + 1 = observation step j (visible if j <= i)
            s = torch.arange(1 + n_obs_steps)[None, :]
            self.register_buffer("tgt_mask", _additive_mask(i >= i.T), persistent=False)
            self.register_buffer("memory_mask", _additive_mask(i >= s - 1), persistent=False)
        else:
            self.tgt_mask = self.memory_mask = None
        self.apply(self._init_weights)
        # GPT-2 initialisation of the learned positional embeddings, as DP
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.cond_pos_emb, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """minGPT / DP initialisation: N(0, 0.02) weights and zero biases for every linear map, including the
        attention projections (nn.MultiheadAttention keeps q, k, v in one in_proj matrix)."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.normal_(module.in_proj_weight, std=0.02)
            nn.init.zeros_(module.in_proj_bias)

    def forward(self, sample: Tensor, timestep: Tensor | int, cond: Tensor) -> Tensor:
        B = sample.shape[0]
        want = (B, self.horizon, self.input_dim)
        if sample.shape != want:
            raise ValueError(f"sample must be [B, {self.horizon}, {self.input_dim}], got {tuple(sample.shape)}")
        if cond.shape != (B, self.n_obs_steps, self.cond_dim):
            raise ValueError(
                f"cond must be [B, {self.n_obs_steps}, {self.cond_dim}] = {(B, self.n_obs_steps, self.cond_dim)}, "
                f"got {tuple(cond.shape)}"
            )
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"timestep must be an int or [B] = ({B},), got {tuple(t.shape)}")

        # conditioning memory: [B, 1 + To, n_emb]
        cond_tokens = torch.cat([self.time_emb(t)[:, None], self.cond_obs_emb(cond)], dim=1)
        memory = self.encoder(self.drop(cond_tokens + self.cond_pos_emb))
        # action tokens: [B, H, n_emb]
        x = self.drop(self.input_emb(sample) + self.pos_emb)
        x = self.decoder(x, memory, tgt_mask=self.tgt_mask, memory_mask=self.memory_mask)
        return self.head(self.ln_f(x))  # [B, H, output_dim]
