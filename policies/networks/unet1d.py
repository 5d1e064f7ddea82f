"""Diffusion Policy's 1-D temporal conditional UNet (Chi et al. 2023, "Diffusion Policy", CNN-based variant):
a UNet over the action horizon whose residual blocks are conditioned by FiLM (Perez et al. 2018) on
cond = [diffusion-step embedding, global observation features].

Timesteps are the DDPM levels of policies/schedulers.py. Besides one level per sample ([B]), one level per
action ([B, T]) is accepted for streaming / diffusion-forcing samplers: each action's level is embedded
separately, so cond becomes a sequence [B, T, cond_dim] and FiLM scales and shifts each time position with its
own level. At a coarser UNet level the cond sequence is subsampled by 2 like the features (the stride-2
downsampling conv is centred on the even positions). With one level per sample the cond sequence has length 1
and broadcasts over time, which is exactly the original global FiLM.

Two-time models (MeanFlow, Geng et al. 2025: u(z, r, t)) set ``second_time_embed=True`` and pass
``timestep2`` (e.g. t - r): a second step encoder of the same form whose embedding is added to the first one.
With the flag off (the default) the module, its parameter names and its outputs are exactly the one-time UNet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn


class SinusoidalPosEmb(nn.Module):
    """Transformer positional encoding (Vaswani et al. 2017, sec. 3.5) of a diffusion step, as in Ho et al.
    2020. t: [...] -> [..., dim]."""

    freqs: Tensor  # [dim // 2]

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        angles = t.to(self.freqs.dtype)[..., None] * self.freqs
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


def conv_block(in_channels: int, out_channels: int, kernel_size: int, n_groups: int) -> nn.Sequential:
    """Conv1d (same length) -> GroupNorm -> Mish. [B, in, L] -> [B, out, L]."""
    return nn.Sequential(
        nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        nn.GroupNorm(n_groups, out_channels),
        nn.Mish(),
    )


class ConditionalResidualBlock1D(nn.Module):
    """Two conv blocks; FiLM from cond after the first: out = scale * out + bias (bias only when not
    cond_predict_scale); 1x1 conv on the residual path when the channel count changes."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cond_dim: int,
        kernel_size: int,
        n_groups: int,
        cond_predict_scale: bool,
    ) -> None:
        super().__init__()
        self.cond_predict_scale = cond_predict_scale
        self.block1 = conv_block(in_channels, out_channels, kernel_size, n_groups)
        self.block2 = conv_block(out_channels, out_channels, kernel_size, n_groups)
        film_dim = 2 * out_channels if cond_predict_scale else out_channels
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, film_dim))
        same_width = in_channels == out_channels
        self.residual = nn.Identity() if same_width else nn.Conv1d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """x: [B, C_in, L], cond: [B, Lc, cond_dim] with Lc in {1, L} -> [B, C_out, L]."""
        h = self.block1(x)
        film = rearrange(self.film(cond), "b l c -> b c l")  # [B, film_dim, Lc]
        if self.cond_predict_scale:
            scale, bias = film.chunk(2, dim=1)
            h = scale * h + bias
        else:
            h = h + film
        return self.block2(h) + self.residual(x)


class ConditionalUnet1D(nn.Module):
    """sample: [B, T, input_dim], timestep: int | [B] | [B, T], global_cond: [B, global_cond_dim]
    -> eps (or velocity): [B, T, input_dim]. T must be divisible by 2 ** (len(down_dims) - 1)."""

    def __init__(
        self,
        input_dim: int,
        global_cond_dim: int,
        diffusion_step_embed_dim: int = 128,
        down_dims: Sequence[int] = (256, 512, 1024),
        kernel_size: int = 5,
        n_groups: int = 8,
        cond_predict_scale: bool = True,
        second_time_embed: bool = False,
    ) -> None:
        super().__init__()
        down_dims, dsed = tuple(down_dims), diffusion_step_embed_dim
        if input_dim < 1:
            raise ValueError(f"input_dim must be >= 1, got {input_dim}")
        if global_cond_dim < 0:
            raise ValueError(f"global_cond_dim must be >= 0, got {global_cond_dim}")
        if dsed < 4 or dsed % 2:
            raise ValueError(f"diffusion_step_embed_dim must be even and >= 4, got {dsed}")
        if not down_dims or any(d % n_groups for d in down_dims):
            raise ValueError(f"down_dims must be non-empty multiples of n_groups={n_groups}, got {down_dims}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-length padding), got {kernel_size}")
        self.input_dim = input_dim
        self.global_cond_dim = global_cond_dim
        self.horizon_multiple = 2 ** (len(down_dims) - 1)

        def step_encoder() -> nn.Sequential:
            return nn.Sequential(
                SinusoidalPosEmb(dsed), nn.Linear(dsed, 4 * dsed), nn.Mish(), nn.Linear(4 * dsed, dsed)
            )

        self.step_encoder = step_encoder()
        cond_dim = dsed + global_cond_dim

        block_args = (cond_dim, kernel_size, n_groups, cond_predict_scale)

        def two_blocks(c_in: int, c_out: int) -> nn.ModuleList:
            first = ConditionalResidualBlock1D(c_in, c_out, *block_args)
            return nn.ModuleList([first, ConditionalResidualBlock1D(c_out, c_out, *block_args)])

        # down level i: (dims[i] -> dims[i+1]) at resolution T / 2**i, then halve T except at the last level
        dims = (input_dim, *down_dims)
        down_pairs = list(zip(dims[:-1], dims[1:], strict=True))
        self.down = nn.ModuleList(two_blocks(c_in, c_out) for c_in, c_out in down_pairs)
        self.downsample = nn.ModuleList(nn.Conv1d(c, c, 3, stride=2, padding=1) for c in down_dims[:-1])
        self.mid = two_blocks(down_dims[-1], down_dims[-1])
        # up level j mirrors down level L-1-j (coarsest first): concatenate that level's skip, two blocks down
        # to the next finer width, then double T. Every up level upsamples, matching the L-1 downsamplings, so
        # the finest down level's skip is never concatenated (as in Diffusion Policy's implementation).
        # (c_in, c_out) = (d[L-1], d[L-2]), .., (d[1], d[0])
        up_pairs = list(zip(down_dims[:0:-1], down_dims[-2::-1], strict=True))
        self.up = nn.ModuleList(two_blocks(2 * c_in, c_out) for c_in, c_out in up_pairs)
        self.upsample = nn.ModuleList(nn.ConvTranspose1d(c, c, 4, stride=2, padding=1) for _, c in up_pairs)
        self.final = nn.Sequential(
            conv_block(down_dims[0], down_dims[0], kernel_size, n_groups),
            nn.Conv1d(down_dims[0], input_dim, 1),
        )
        # Built last so that the other modules draw the same initial weights with or without it.
        self.step_encoder2 = step_encoder() if second_time_embed else None

    def _levels(self, timestep: Tensor | float, B: int, T: int, device: torch.device, name: str) -> Tensor:
        """int/float, [B] or [B, T] -> [B, Lc] with Lc in {1, T}."""
        t = torch.as_tensor(timestep, device=device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape == (B,):
            return t[:, None]  # one level per sample: a length-1 cond sequence, broadcast over time by FiLM
        if t.shape != (B, T):
            raise ValueError(f"{name} must be an int, [B] or [B, T] = {(B, T)}, got {tuple(t.shape)}")
        return t

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | int,
        global_cond: Tensor,
        timestep2: Tensor | float | None = None,
    ) -> Tensor:
        if sample.ndim != 3 or sample.shape[-1] != self.input_dim:
            raise ValueError(f"sample must be [B, T, {self.input_dim}], got {tuple(sample.shape)}")
        B, T, _ = sample.shape
        if T % self.horizon_multiple:
            raise ValueError(f"horizon must be divisible by {self.horizon_multiple}, got {T}")
        if global_cond.shape != (B, self.global_cond_dim):
            raise ValueError(
                f"global_cond must be [B, {self.global_cond_dim}] = {(B, self.global_cond_dim)}, "
                f"got {tuple(global_cond.shape)}"
            )
        t = self._levels(timestep, B, T, sample.device, "timestep")
        if (timestep2 is None) != (self.step_encoder2 is None):
            raise ValueError(
                "timestep2 must be given exactly when the UNet was built with second_time_embed=True "
                f"(second_time_embed={self.step_encoder2 is not None}, timestep2 given: {timestep2 is not None})"
            )
        if self.step_encoder2 is None:
            step_emb = self.step_encoder(t)  # [B, Lc, dsed], Lc in {1, T}
        else:
            t, t2 = torch.broadcast_tensors(t, self._levels(timestep2, B, T, sample.device, "timestep2"))
            step_emb = self.step_encoder(t) + self.step_encoder2(t2)
        cond = torch.cat([step_emb, global_cond[:, None].expand(-1, t.shape[1], -1)], dim=-1)  # [B, Lc, cond]
        x = rearrange(sample, "b t d -> b d t")  # [B, input_dim, T]

        skips, conds = [], []  # per down level: x [B, down_dims[i], T / 2**i], cond [B, Lc / 2**i, cond_dim]
        for i, (block1, block2) in enumerate(self.down):
            x = block2(block1(x, cond), cond)
            skips.append(x)
            if i < len(self.downsample):
                conds.append(cond)
                x = self.downsample[i](x)
                cond = cond[:, ::2]  # no-op when Lc = 1
        for block in self.mid:
            x = block(x, cond)  # [B, down_dims[-1], T / 2**(L-1)]
        for (block1, block2), upsample in zip(self.up, self.upsample, strict=True):
            x = torch.cat([x, skips.pop()], dim=1)  # same resolution: the coarsest remaining down level
            x = upsample(block2(block1(x, cond), cond))
            cond = conds.pop()
        return rearrange(self.final(x), "b d t -> b t d")  # [B, T, input_dim]
