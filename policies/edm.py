"""EDM objective and sampler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models"), as used by BESO (Reuss et al. 2023) and MoDE (Reuss et al. 2025).

Time convention (used everywhere in this module):
    x = a + sigma * eps, eps ~ N(0, I), with the noise level sigma in [sigma_min, sigma_max] (sigma = 0 is the clean
    action chunk a). The network is wrapped into EDM's *denoiser* D(x; sigma) ~ E[a | x], which predicts the clean
    sample, not epsilon:
        D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))          (EDM eq. 7)
    Sampling walks a descending list of levels sigma_0 = sigma_max > ... > sigma_{n-1} = sigma_min and then to 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# BESO / MoDE's training density: log-logistic in sigma, i.e. logistic in ln(sigma), centred on ln(sigma_data) with
# scale 0.5 and truncated to [sigma_min, sigma_max] (BESO, sec. 4; MoDE's `make_sample_density("loglogistic")`).
LOG_LOGISTIC_SCALE = 0.5


@dataclasses.dataclass(frozen=True)
class EDM:
    """Preconditioning, training-noise density and sampling schedule; plain floats, no state."""

    sigma_data: float = 0.5
    sigma_min: float = 1e-3
    sigma_max: float = 80.0

    def __post_init__(self) -> None:
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {self.sigma_data}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"sigma_min and sigma_max must satisfy 0 < sigma_min < sigma_max, "
                f"got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"
            )

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """EDM Table 1 ("ours"): sigma: [...] -> (c_skip, c_out, c_in, c_noise), each [...]:
        c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2),
        c_noise = ln(sigma) / 4."""
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        return sd2 / total, sigma * self.sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2 (EDM Table 1), so that
        lambda ||D - a||^2 = ||F - (a - c_skip x) / c_out||^2 has unit weight at every level."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def sample_sigma(
        self, n: int, *, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> Tensor:
        """n training levels [n] from the truncated log-logistic density (inverse CDF, in float64)."""
        loc = math.log(self.sigma_data)

        def cdf(s: float) -> float:  # logistic CDF of ln(sigma)
            return 1.0 / (1.0 + math.exp(-(math.log(s) - loc) / LOG_LOGISTIC_SCALE))

        lo, hi = cdf(self.sigma_min), cdf(self.sigma_max)
        u = torch.rand(n, dtype=torch.float64, device=device, generator=generator) * (hi - lo) + lo
        sigma = (u.logit() * LOG_LOGISTIC_SCALE + loc).exp()
        # rounding at the truncation points can leave the interval by an ulp
        return sigma.clamp(self.sigma_min, self.sigma_max).float()

    def sigmas(self, num_steps: int) -> list[float]:
        """Exponential schedule (k-diffusion's `get_sigmas_exponential`): num_steps levels equally spaced in
        ln(sigma) from sigma_max down to sigma_min (a single step uses sigma_max). The sampler's last step goes
        from sigma_min to 0."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if num_steps == 1:
            return [self.sigma_max]
        hi, lo = math.log(self.sigma_max), math.log(self.sigma_min)
        return [math.exp(hi + (lo - hi) * i / (num_steps - 1)) for i in range(num_steps)]


def ddim_sample(denoise_fn: Callable[[Tensor, int], Tensor], x_init: Tensor, sigmas: Sequence[float]) -> Tensor:
    """Deterministic DDIM in EDM form, which is also DPM-Solver-1 (Lu et al. 2022, data prediction, first order in
    lambda = -ln sigma) and Euler on the probability-flow ODE dx/dsigma = (x - D) / sigma:
        x_{i+1} = D_i + (sigma_{i+1} / sigma_i) (x_i - D_i),   sigma_n = 0, so the last step returns D.
    denoise_fn(x: [B, ...], i) -> D(x; sigmas[i]): [B, ...]; it gets the step index so that callers can key
    per-level caches on it. x_init: [B, ...] is the sample at sigmas[0] (noise * sigma_max for a fresh chunk)."""
    if not sigmas or any(a <= b for a, b in zip(sigmas[:-1], sigmas[1:], strict=True)) or sigmas[-1] <= 0:
        raise ValueError(f"sigmas must be a non-empty strictly descending list of positive levels, got {sigmas}")
    x = x_init
    for i, sigma in enumerate(sigmas):
        denoised = denoise_fn(x, i)
        ratio = sigmas[i + 1] / sigma if i + 1 < len(sigmas) else 0.0
        x = denoised + ratio * (x - denoised) if ratio > 0 else denoised
    return x
