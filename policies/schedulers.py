"""DDPM noise schedule with DDPM/DDIM samplers.

Time convention (used everywhere in this module):
    discrete DDPM timesteps k = 0 (clean, least noisy) .. K-1 (noisiest); the network predicts epsilon;
    x_k = sqrt(abar_k) x_0 + sqrt(1 - abar_k) eps,  abar_k = prod_{i<=k} (1 - beta_i)  (Ho et al. 2020 eq. 4).
    Level k = -1 denotes the clean sample itself (abar_{-1} = 1); it is only ever a step *target*.

Why our own module and not diffusers' schedulers: diffusers keeps per-call state (`set_timesteps`) and takes
one scalar timestep per call. We need
  - per-sample AND per-action timesteps (t of shape [B] or [B, H]) for streaming / diffusion-forcing policies;
  - starting from a given sample at an intermediate level (warm-started real-time-iteration sampling);
  - stepping between two arbitrary listed levels with the proper DDIM/posterior update between the two actual
    noise levels (a sparse list of DDPM timesteps is not DDPM);
  - injected initial noise (deterministic sampling for DSRL / composition);
  - a sampling loop without per-step Python object overhead.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import torch
from einops import repeat
from torch import Tensor, nn

BETA_SCHEDULES = ("squaredcos_cap_v2", "linear", "scaled_linear")


def _cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: abar(t) = cos((t + s) / (1 + s) * pi / 2)^2 with s = 0.008, and
    beta_k = 1 - abar((k+1)/K) / abar(k/K) capped at 0.999 to avoid the singularity at t = 1."""
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    abar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


class DDPMSchedule(nn.Module):
    """Noise schedule + DDIM/DDPM update. Buffers are non-persistent: everything is derived from the
    constructor arguments, so nothing derived lands in checkpoints, and `.to(device)` moves it all."""

    betas: Tensor  # [K]
    alphas: Tensor  # [K]
    alphas_cumprod: Tensor  # [K]
    _abar_from_clean: Tensor  # [K + 1]: abar_{k} at index k + 1, so level -1 (clean) has abar = 1

    def __init__(
        self,
        num_train_timesteps: int = 100,
        beta_schedule: str = "squaredcos_cap_v2",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
    ) -> None:
        super().__init__()
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        if clip_sample_range <= 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range}")
        if beta_schedule == "squaredcos_cap_v2":
            betas = _cosine_betas(num_train_timesteps)
        elif beta_schedule in ("linear", "scaled_linear"):
            K, f64 = num_train_timesteps, torch.float64
            if not 0 < beta_start <= beta_end < 1:
                raise ValueError(
                    f"beta_start, beta_end must satisfy 0 < beta_start <= beta_end < 1, "
                    f"got beta_start={beta_start}, beta_end={beta_end}"
                )
            if beta_schedule == "linear":  # Ho et al. 2020, sec. 4
                betas = torch.linspace(beta_start, beta_end, K, dtype=f64)
            else:  # latent-diffusion "scaled_linear": linear in sqrt(beta)
                betas = torch.linspace(beta_start**0.5, beta_end**0.5, K, dtype=f64) ** 2
        else:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
        self.num_train_timesteps = num_train_timesteps
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        alphas = 1 - betas
        abar = torch.cumprod(alphas, dim=0)  # products in float64, stored as float32
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas", alphas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", abar.float(), persistent=False)
        abar_from_clean = torch.cat([abar.new_ones(1), abar]).float()
        self.register_buffer("_abar_from_clean", abar_from_clean, persistent=False)

    def _abar(self, t: int | Tensor, x: Tensor, name: str, lowest: int = 0) -> Tensor:
        """abar_t broadcastable to x: a 0-d tensor for an int t, [B, 1, ..] for t: [B], [B, H, 1, ..] for
        t: [B, H] (one level per action row). `lowest` = -1 admits the clean level."""
        K = self.num_train_timesteps
        if not isinstance(t, Tensor):
            t = operator.index(t)  # ints (and numpy ints) only; a float level is a bug upstream
            if not lowest <= t < K:
                raise ValueError(f"{name} must be in [{lowest}, {K - 1}], got {t}")
            return self._abar_from_clean[t + 1].to(x.dtype)
        if t.dtype.is_floating_point or t.shape != x.shape[: t.ndim]:
            raise ValueError(
                f"{name} must be an integer tensor of shape [B] or [B, H] matching x's leading dims "
                f"{tuple(x.shape[:2])}, got {t.dtype} {tuple(t.shape)}"
            )
        if t.numel() and (t.min() < lowest or t.max() >= K):
            raise ValueError(f"{name} must be in [{lowest}, {K - 1}], got values in [{t.min()}, {t.max()}]")
        abar = self._abar_from_clean[t + 1].to(x.dtype)
        return abar[(...,) + (None,) * (x.ndim - t.ndim)]

    def add_noise(self, x0: Tensor, noise: Tensor, t: int | Tensor) -> Tensor:
        """Forward process q(x_t | x_0) (Ho et al. 2020 eq. 4).
        x0, noise: [B, ...]; t: int, [B] or [B, H] (per action row) -> x_t: [B, ...]."""
        abar = self._abar(t, x0, "t")
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def _x0(self, x_t: Tensor, eps: Tensor, abar_t: Tensor) -> Tensor:
        x0 = (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0

    def predict_x0(self, x_t: Tensor, eps: Tensor, t: int | Tensor) -> Tensor:
        """x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clipped to +-clip_sample_range when
        clip_sample. x_t, eps: [B, ...]; t as in add_noise -> x0_hat: [B, ...]."""
        return self._x0(x_t, eps, self._abar(t, x_t, "t"))

    def epsilon_from_x0(self, x_t: Tensor, x0: Tensor, t: int | Tensor) -> Tensor:
        """The epsilon that a clean-sample prediction implies: (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)
        (inverse of ``predict_x0`` without clipping). x_t, x0: [B, ...]; t as in add_noise -> eps: [B, ...]."""
        abar = self._abar(t, x_t, "t")
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    def _ddim_update(
        self,
        x_t: Tensor,
        eps: Tensor,
        abar_t: Tensor,
        abar_prev: Tensor,
        eta: float,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Song et al. 2021, eq. 12 with sigma from eq. 16:
            x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
            sigma  = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).
        eps_hat is re-derived from the (possibly clipped) x0_hat so that x_t, x0_hat, eps_hat stay consistent;
        with eta = 1 and prev = t - 1 this is then exactly the DDPM posterior q(x_{t-1} | x_t, x0_hat)
        (Ho et al. 2020 eq. 6-7), which is also what diffusers' DDPMScheduler samples."""
        if not 0.0 <= eta <= 1.0:  # eta > 1 can make 1 - abar_prev - sigma^2 negative
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        x0 = self._x0(x_t, eps, abar_t)
        eps_hat = (x_t - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()
        var = eta**2 * (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev - var).clamp(min=0).sqrt() * eps_hat
        if eta > 0:
            z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
            x_prev = x_prev + var.sqrt() * z
        return x_prev

    def step(
        self,
        x_t: Tensor,
        eps: Tensor,
        t: int | Tensor,
        t_prev: int | Tensor,
        *,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """One update from level t to a lower level t_prev (-1 = clean).
        x_t, eps: [B, ...]; t, t_prev: int, [B] or [B, H] -> x_{t_prev}: [B, ...].
        eta = 0: deterministic DDIM; eta = 1 with t_prev = t - 1: DDPM ancestral step."""
        abar_t = self._abar(t, x_t, "t")
        abar_prev = self._abar(t_prev, x_t, "t_prev", lowest=-1)
        # abar is strictly decreasing in k, so comparing abar compares levels, for any mix of t/t_prev shapes
        if bool((abar_prev <= abar_t).any()):
            raise ValueError(f"t_prev must be lower than t (elementwise), got t={t}, t_prev={t_prev}")
        return self._ddim_update(x_t, eps, abar_t, abar_prev, eta, generator)

    def timesteps(self, num_inference_steps: int, start_t: int | None = None) -> list[int]:
        """Descending levels for n = num_inference_steps denoiser calls, "trailing" spacing (Lin et al. 2024,
        "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.3; diffusers'
        timestep_spacing="trailing"):
            t_i = round((start_t + 1) * (n - i) / n) - 1,  i = 0 .. n-1,  start_t = K-1 by default.
        The list always begins at start_t, so pure noise is labelled K-1. The "leading" rule ([90, 80, .., 0]
        for K=100, n=10) would label pure noise as level 90, and as level 0 for n=1 (one-step sampling would
        then return the clipped noise). K=100: n=10 -> [99, 89, .., 9]; n=K -> [K-1, .., 0].
        A warm start (start_t) takes the n levels from start_t (included) down towards 0; the sampler's last
        step always goes to -1."""
        K = self.num_train_timesteps
        top = K - 1 if start_t is None else start_t
        if not 0 <= top < K:
            raise ValueError(f"start_t must be in [0, {K - 1}], got {start_t}")
        n = num_inference_steps
        if not 1 <= n <= top + 1:
            raise ValueError(f"num_inference_steps must be in [1, {top + 1}] for start_t={top}, got {n}")
        # integer round-half-up of (top + 1) * (n - i) / n; spacing >= 1 keeps the levels distinct
        return [(2 * (top + 1) * (n - i) + n) // (2 * n) - 1 for i in range(n)]

    def sample(
        self,
        denoise_fn: Callable[[Tensor, Tensor], Tensor],
        x_init: Tensor,
        timesteps: Sequence[int],
        *,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """x_init: [B, ...] is the sample at level timesteps[0] (pure noise when that is K-1, a partially
        noised chunk for warm starts); denoise_fn(x_t: [B, ...], t: LongTensor[B]) -> eps: [B, ...].
        Steps through consecutive listed levels, the last step to -1 (clean); returns x_0: [B, ...].
        "DDPM" sampling = eta=1 over all K levels; "DDIM" = eta=0 over a sparse list."""
        levels = [operator.index(t) for t in timesteps]
        if not levels or any(a <= b for a, b in zip(levels[:-1], levels[1:], strict=True)):
            raise ValueError(f"timesteps must be a non-empty strictly descending list, got {levels}")
        if not 0 <= levels[-1] <= levels[0] < self.num_train_timesteps:
            raise ValueError(f"timesteps must be in [0, {self.num_train_timesteps - 1}], got {levels}")
        # all per-step lookups done once: abar: [n + 1] ending with the clean level, t_batch: [n, B]
        abar = self._abar_from_clean[torch.tensor(levels + [-1], device=x_init.device) + 1].to(x_init.dtype)
        t_batch = repeat(torch.tensor(levels, device=x_init.device), "n -> n b", b=x_init.shape[0])
        x = x_init
        for i in range(len(levels)):
            eps = denoise_fn(x, t_batch[i])
            x = self._ddim_update(x, eps, abar[i], abar[i + 1], eta, generator)
        return x
