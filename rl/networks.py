"""Small networks for RL: MLPs, a tanh-squashed Gaussian actor head and twin Q critics.

Shapes: inputs ``[B, D_in]`` (flattened features and actions), outputs ``[B, D_out]``; Q values ``[B]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # SAC's usual clamp on the actor's log-std (CleanRL, SpinningUp)


class MLP(nn.Sequential):
    """``D_in -> hidden... -> D_out`` with SiLU activations and LayerNorm after every hidden layer (stable critics
    under high update-to-data ratios, Ball et al. 2023). ``zero_last`` initialises the output layer to zero."""

    def __init__(self, in_dim: int, hidden_dims: list[int], out_dim: int, zero_last: bool = False) -> None:
        layers: list[nn.Module] = []
        for width in hidden_dims:
            layers += [nn.Linear(in_dim, width), nn.LayerNorm(width), nn.SiLU()]
            in_dim = width
        last = nn.Linear(in_dim, out_dim)
        if zero_last:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        super().__init__(*layers, last)


class GaussianHead(nn.Module):
    """State-dependent Gaussian squashed by tanh to ``(-1, 1)^D`` (SAC). ``sample`` returns the squashed sample and
    its log-probability with the change-of-variables term log(1 - tanh(u)^2)."""

    def __init__(self, in_dim: int, hidden_dims: list[int], out_dim: int) -> None:
        super().__init__()
        self.trunk = MLP(in_dim, hidden_dims[:-1], hidden_dims[-1])
        self.mu = nn.Linear(hidden_dims[-1], out_dim)
        self.log_std = nn.Linear(hidden_dims[-1], out_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.nn.functional.silu(self.trunk(x))
        return self.mu(h), self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self(x)[0])

    def sample(self, x: torch.Tensor, xi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, D_in]`` -> ``(tanh(mu + std * xi) [B, D], log_prob [B])``; ``xi`` None draws a standard normal."""
        mu, log_std = self(x)
        xi = torch.randn_like(mu) if xi is None else xi
        u = mu + log_std.exp() * xi
        # log N(u; mu, std) = -xi^2/2 - log std - log(2 pi)/2, then the tanh Jacobian in its stable softplus form.
        log_prob = (-0.5 * xi.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2 * (math.log(2) - u - nn.functional.softplus(-2 * u))).sum(-1)
        return torch.tanh(u), log_prob


class TwinQ(nn.Module):
    """Two independent Q networks ``Q_i(x, a) -> [B]`` (clipped double Q, Fujimoto et al. 2018)."""

    def __init__(self, in_dim: int, action_dim: int, hidden_dims: list[int]) -> None:
        super().__init__()
        self.qf1 = MLP(in_dim + action_dim, hidden_dims, 1)
        self.qf2 = MLP(in_dim + action_dim, hidden_dims, 1)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xa = torch.cat([x, a], dim=-1)
        return self.qf1(xa).squeeze(-1), self.qf2(xa).squeeze(-1)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak averaging ``target <- (1 - tau) target + tau source``."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.lerp_(s, tau)
