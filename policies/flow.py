"""Flow-matching objective and samplers: rectified flow and MeanFlow.

Time convention (used everywhere in this module and by the flow_unet / meanflow / ofql policies):
    t = 0 data, t = 1 noise;  x_t = (1 - t) a + t eps,  v = dx_t/dt = eps - a  (a: normalized action chunk).
    Sampling integrates dx/dt = v from t = 1 (x = eps) down to t = 0, so every step goes to a LOWER t.
    MeanFlow's average velocity over [r, t] (r <= t): u(z_t, r, t) = 1 / (t - r) * int_r^t v(z_s, s) ds, hence
    z_r = z_t - (t - r) u(z_t, r, t), and u(z, t, t) = v(z, t).

Rectified flow / flow matching: Liu et al. 2023, "Flow Straight and Fast"; Lipman et al. 2023, "Flow Matching for
Generative Modeling". MeanFlow: Geng et al. 2025, "Mean Flows for One-step Generative Modeling".
All functions are differentiable (no torch.no_grad inside): policies that backpropagate through sampling (OFQL's
actor term) call them directly; inference wraps them in no_grad.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

TIME_DISTRIBUTIONS = ("uniform", "logit_normal")
SAMPLERS = ("euler", "midpoint")

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x_t [B, ...], t [B]) -> v [B, ...]
AverageVelocityFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (z_t [B, ...], r [B], t [B]) -> u [B, ...]


def _expand(t: Tensor, x: Tensor) -> Tensor:
    """t: [B] (or [B, H]) -> broadcastable against x: [B, H, D]."""
    return t[(...,) + (None,) * (x.ndim - t.ndim)]


def sample_time(
    n: int,
    distribution: str,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """n training times in (0, 1): ``uniform``, or ``logit_normal`` = sigmoid(N(mean, std)) (Esser et al. 2024,
    SD3 sec. 3.1), which puts more samples at intermediate t where the velocity is hardest to predict."""
    if distribution == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if distribution == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))
    raise ValueError(f"time distribution must be one of {TIME_DISTRIBUTIONS}, got '{distribution}'")


def interpolate(a: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) a + t eps.  a, eps: [B, H, D]; t: [B] -> x_t: [B, H, D]."""
    t = _expand(t, a)
    return (1 - t) * a + t * eps


def time_grid(num_steps: int, device: torch.device | str | None = None, start: float = 1.0) -> Tensor:
    """num_steps uniform steps from t = start (1: pure noise; lower: a warm start) to data:
    [start, start (1 - 1/n), ..., 0] of shape [num_steps + 1]."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < start <= 1:
        raise ValueError(f"start must be in (0, 1], got {start}")
    return torch.linspace(start, 0.0, num_steps + 1, device=device)


def _check_grid(grid: Tensor) -> None:
    if grid.ndim != 1 or grid.numel() < 2 or bool((grid[1:] >= grid[:-1]).any()):
        raise ValueError(f"time grid must be a 1-D strictly decreasing tensor of >= 2 times, got {grid.tolist()}")


def integrate(velocity_fn: VelocityFn, x: Tensor, grid: Tensor, method: str = "euler") -> Tensor:
    """Solve dx/dt = v(x, t) from t = grid[0] (x given, pure noise when grid[0] = 1) to t = grid[-1].

    ``euler``: x <- x - h v(x, t); ``midpoint`` (explicit second-order Runge-Kutta): x <- x - h v(x - h/2 v, t - h/2),
    with h = t_i - t_{i+1} > 0; midpoint costs 2 network calls per step. Deterministic given x.
    x: [B, ...]; grid: [n + 1] decreasing -> x at grid[-1]: [B, ...].
    """
    if method not in SAMPLERS:
        raise ValueError(f"method must be one of {SAMPLERS}, got '{method}'")
    _check_grid(grid)
    ts = grid.to(x.device, x.dtype)[:, None].expand(-1, x.shape[0])  # [n + 1, B]
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        h = _expand(t - t_next, x)
        v = velocity_fn(x, t)
        if method == "midpoint":
            v = velocity_fn(x - h / 2 * v, (t + t_next) / 2)
        x = x - h * v
    return x


# -- MeanFlow ---------------------------------------------------------------------------------------------------
def sample_r_t(
    n: int,
    distribution: str,
    ratio_r_neq_t: float,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(r, t) with r <= t: two draws sorted (Geng et al. 2025, sec. 4.3), then r = t for a fraction
    1 - ratio_r_neq_t of the samples (plain flow matching on those; the paper's default keeps r != t for 25 %)."""
    if not 0.0 <= ratio_r_neq_t <= 1.0:
        raise ValueError(f"ratio_r_neq_t must be in [0, 1], got {ratio_r_neq_t}")
    a, b = (sample_time(n, distribution, mean=mean, std=std, device=device, generator=generator) for _ in range(2))
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    keep = torch.rand(n, device=device, generator=generator) < ratio_r_neq_t
    return torch.where(keep, r, t), t


def meanflow_target(
    u_fn: Callable[..., Tensor], z: Tensor, r: Tensor, t: Tensor, v: Tensor, *batch_args: Tensor
) -> tuple[Tensor, Tensor]:
    """The MeanFlow identity as a regression target (Geng et al. 2025, eq. 6 and 10):
        u_tgt = v - (t - r) d/dt u(z_t, r, t),   d/dt u = v . d_z u + d_t u   (dr/dt = 0, dz_t/dt = v),
    the total derivative taken by ONE forward-mode Jacobian-vector product with tangents (v, 0, 1) (eq. 8).

    z: [B, H, D] = z_t; r, t: [B]; v: [B, H, D] the conditional velocity eps - a; ``batch_args`` (e.g. the
    observation features [B, ...]) are passed on as ``u_fn(z, r, t, *batch_args)``, and u_fn must treat the samples
    of a batch independently (no batch statistics).
    Returns (u, u_tgt): u = u_fn(z, r, t, ...) keeps its graph to the parameters; u_tgt is detached (stop-gradient,
    eq. 9). The jvp runs only on the samples with r < t, outside autograd: where r = t the target is v whatever the
    derivative (plain flow matching, 75 % of the samples at the paper's ratio), and the target needs no graph, so a
    training step costs a forward and backward of the batch plus a jvp of that fraction: 1.26x faster than one jvp
    of the whole batch under autograd (Push-T MeanFlow, batch 256, one thread: 1.09 s vs 1.37 s per step;
    benchmarks/meanflow_step.py).
    """
    u = u_fn(z, r, t, *batch_args)
    u_tgt = v.detach().clone()
    idx = torch.nonzero(r < t).squeeze(1)
    if idx.numel():
        rows = [a[idx] for a in batch_args]
        with torch.no_grad():
            _, dudt = torch.func.jvp(
                lambda z_, r_, t_: u_fn(z_, r_, t_, *rows),
                (z[idx], r[idx], t[idx]),
                (v[idx], torch.zeros_like(r[idx]), torch.ones_like(t[idx])),
            )
        u_tgt[idx] -= _expand(t[idx] - r[idx], dudt) * dudt
    return u, u_tgt


def meanflow_loss(u: Tensor, u_tgt: Tensor, adaptive_power: float = 0.0, c: float = 1e-3) -> Tensor:
    """power 0: MSE. power p > 0: the paper's adaptive weighting (Geng et al. 2025, sec. 4.3):
    mean_b sg(w_b) ||u_b - u_tgt_b||^2 with w_b = 1 / (||u_b - u_tgt_b||^2 + c)^p (p = 0.5 is the pseudo-Huber
    loss; p = 1 their ImageNet choice). u, u_tgt: [B, ...] -> scalar."""
    if adaptive_power == 0:
        return torch.nn.functional.mse_loss(u, u_tgt)
    sq = (u - u_tgt).pow(2).flatten(1).sum(1)  # [B]
    return ((sq.detach() + c).pow(-adaptive_power) * sq).mean()


def meanflow_sample(u_fn: AverageVelocityFn, z: Tensor, grid: Tensor) -> Tensor:
    """z_{t_{i+1}} = z_{t_i} - (t_i - t_{i+1}) u(z_{t_i}, t_{i+1}, t_i) over a decreasing grid; one step over
    [1, 0] is the one-step sample a = eps - u(eps, 0, 1) (Geng et al. 2025, eq. 12). z: [B, ...] -> [B, ...]."""
    _check_grid(grid)
    ts = grid.to(z.device, z.dtype)[:, None].expand(-1, z.shape[0])  # [n + 1, B]
    for t, r in zip(ts[:-1], ts[1:], strict=True):
        z = z - _expand(t - r, z) * u_fn(z, r, t)
    return z
