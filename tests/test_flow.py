"""Flow matching and MeanFlow math (policies/flow.py), the UNet's second time embedding, flow_unet / meanflow.

Time convention: t = 0 data, t = 1 noise, x_t = (1 - t) a + t eps, v = eps - a.
"""

from __future__ import annotations

import math

import pytest
import torch

from data.pusht import shape_meta
from policies import flow
from policies.flow_unet import FlowUnetConfig
from policies.meanflow import MeanFlowConfig
from policies.networks import ConditionalUnet1D
from policies.registry import make_policy

A0 = torch.tensor([[0.3, -0.7], [0.1, 0.5]])  # a fixed "data" chunk [H=2, D=2]


def single_point_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact marginal velocity when the data is the single point A0: x_t = (1 - t) A0 + t eps gives
    v = eps - A0 = (x_t - A0) / t. Its trajectories are straight lines."""
    return (x - A0) / t[:, None, None]


def tiny_policy(config_cls: type = MeanFlowConfig, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = config_cls(
        horizon=8, down_dims=[16, 32], diffusion_step_embed_dim=16, kernel_size=3, n_action_steps=4, **overrides
    )
    policy = make_policy(cfg, shape_meta("state"))
    policy.fit_normalizer({"state": torch.rand(64, 20) * 400 + 50, "action": torch.rand(64, 2) * 300 + 100})
    return policy.eval()


def obs_for(policy, b: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"state": torch.rand(b, policy.config.n_obs_steps, 20, generator=g) * 400 + 50}


# -- rectified flow ---------------------------------------------------------------------------------------------
def test_interpolation_endpoints_and_velocity() -> None:
    a, eps = torch.randn(4, 8, 2), torch.randn(4, 8, 2)
    torch.testing.assert_close(flow.interpolate(a, eps, torch.zeros(4)), a)
    torch.testing.assert_close(flow.interpolate(a, eps, torch.ones(4)), eps)
    t, dt = torch.full((4,), 0.3), 1e-3  # dx_t/dt = eps - a
    fd = (flow.interpolate(a, eps, t + dt) - flow.interpolate(a, eps, t - dt)) / (2 * dt)
    torch.testing.assert_close(fd, eps - a, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_euler_is_exact_on_a_straight_path(steps: int) -> None:
    eps = torch.randn(5, 2, 2, generator=torch.Generator().manual_seed(0))
    x0 = flow.integrate(single_point_velocity, eps, flow.time_grid(steps), "euler")
    torch.testing.assert_close(x0, A0.expand(5, -1, -1), atol=1e-6, rtol=0)


def test_midpoint_beats_euler_on_a_curved_field() -> None:
    x1 = torch.ones(1, 2, 2)
    exact = x1 * math.exp(-1)  # dx/dt = x from t = 1 to 0: x(0) = x(1) e^-1
    grid = flow.time_grid(4)
    euler = flow.integrate(lambda x, t: x, x1, grid, "euler")
    midpoint = flow.integrate(lambda x, t: x, x1, grid, "midpoint")
    torch.testing.assert_close(euler, x1 * (1 - 0.25) ** 4)  # the two update rules, by hand
    torch.testing.assert_close(midpoint, x1 * (1 - 0.25 + 0.25**2 / 2) ** 4)
    assert (midpoint - exact).abs().max() < 0.1 * (euler - exact).abs().max()


def test_sampler_and_grid_errors() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        flow.integrate(single_point_velocity, torch.zeros(1, 2, 2), flow.time_grid(2), "rk4")
    with pytest.raises(ValueError, match="strictly decreasing"):
        flow.integrate(single_point_velocity, torch.zeros(1, 2, 2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        flow.time_grid(0)
    with pytest.raises(ValueError, match="time distribution must be one of"):
        flow.sample_time(4, "beta")


def test_time_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    u = flow.sample_time(20000, "uniform", generator=g)
    ln = flow.sample_time(20000, "logit_normal", mean=-0.4, std=1.0, generator=g)
    assert u.min() > 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert ln.min() > 0 and ln.max() < 1
    torch.testing.assert_close(torch.logit(ln).mean(), torch.tensor(-0.4), atol=0.03, rtol=0)
    r, t = flow.sample_r_t(20000, "logit_normal", 0.25, generator=g)
    assert (r <= t).all()
    assert abs((r < t).float().mean() - 0.25) < 0.02  # the paper's 25 % of samples with r != t


def test_flow_unet_samples_by_euler_over_the_network() -> None:
    policy = tiny_policy(FlowUnetConfig)
    obs = obs_for(policy)
    noise = torch.randn(3, 8, 2, generator=torch.Generator().manual_seed(2))
    cond = policy.encode_obs(obs)
    x = noise
    for i in range(10):  # the Euler update by hand, t = 1, 0.9, .., 0.1
        t = torch.full((3,), 1 - i / 10)
        x = x - 0.1 * policy.denoise(x, t, cond)
    expected = policy.normalizer.unnormalize("action", x.clamp(-1, 1))
    torch.testing.assert_close(policy.predict_action_chunk(obs, noise=noise), expected, atol=1e-5, rtol=1e-5)


# -- MeanFlow ---------------------------------------------------------------------------------------------------
class TinyU(torch.nn.Module):
    """A smooth nonlinear u(z, r, t): [B, H, D], [B], [B] -> [B, H, D] (float64), for finite differences."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()

    def forward(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = torch.cat([z.flatten(1), r[:, None], t[:, None]], dim=1)
        return self.net(x).view_as(z) * (1 + t[:, None, None] ** 2)


def mf_inputs(b: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    z, v = (
        torch.randn(b, 2, 2, generator=g, dtype=torch.float64),
        torch.randn(b, 2, 2, generator=g, dtype=torch.float64),
    )
    t = torch.rand(b, generator=g, dtype=torch.float64) * 0.8 + 0.2
    r = t * torch.rand(b, generator=g, dtype=torch.float64)
    return z, r, t, v


def test_meanflow_target_is_the_flow_matching_target_when_r_equals_t() -> None:
    u_fn = TinyU()
    z, _, t, v = mf_inputs()
    u, u_tgt = flow.meanflow_target(u_fn, z, t, t, v)
    torch.testing.assert_close(u_tgt, v)
    torch.testing.assert_close(u, u_fn(z, t, t))


def test_meanflow_jvp_target_matches_finite_differences() -> None:
    u_fn = TinyU()
    z, r, t, v = mf_inputs()
    u, u_tgt = flow.meanflow_target(u_fn, z, r, t, v)
    assert u.requires_grad and not u_tgt.requires_grad  # stop-gradient on the target only
    h = 1e-6  # d/dt u(z_t, r, t) along z_t' = v: central difference in s of u(z + s v, r, t + s)
    dudt = (u_fn(z + h * v, r, t + h) - u_fn(z - h * v, r, t - h)) / (2 * h)
    torch.testing.assert_close(u_tgt, v - (t - r)[:, None, None] * dudt, atol=1e-7, rtol=1e-7)


def test_meanflow_jvp_through_the_two_time_unet_matches_finite_differences() -> None:
    torch.manual_seed(0)
    net = ConditionalUnet1D(2, 6, 16, (16, 32), 3, second_time_embed=True).double()
    cond = torch.randn(5, 6, dtype=torch.float64)
    _, r, t, _ = mf_inputs()
    z, v = torch.randn(2, 5, 8, 2, dtype=torch.float64)  # [B, H, Da] with H divisible by 2

    def u_fn(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(z, t * 100, cond, timestep2=(t - r) * 100)

    _, u_tgt = flow.meanflow_target(u_fn, z, r, t, v)
    h = 1e-6
    dudt = (u_fn(z + h * v, r, t + h) - u_fn(z - h * v, r, t - h)) / (2 * h)
    torch.testing.assert_close(u_tgt, v - (t - r)[:, None, None] * dudt, atol=1e-5, rtol=1e-5)


def test_meanflow_target_on_a_mixed_batch_equals_the_whole_batch_jvp() -> None:
    """The jvp runs only on the r < t rows, outside autograd, with the observation features passed per row: the
    target equals one jvp of the whole batch (the definition), and the loss gradient flows through u only."""
    torch.manual_seed(0)
    net = ConditionalUnet1D(2, 6, 16, (16, 32), 3, second_time_embed=True).double()
    cond = torch.randn(6, 6, dtype=torch.float64)
    z, v = torch.randn(2, 6, 8, 2, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.3, 0.7, 0.95, 0.2], dtype=torch.float64)
    r = torch.where(torch.tensor([True, False, True, False, False, True]), t * 0.4, t)  # 3 rows with r = t

    def u_fn(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return net(z, t * 100, c, timestep2=(t - r) * 100)

    u, u_tgt = flow.meanflow_target(u_fn, z, r, t, v, cond)
    u_ref, dudt = torch.func.jvp(lambda a, b, c: u_fn(a, b, c, cond), (z, r, t), (v, torch.zeros(6), torch.ones(6)))
    torch.testing.assert_close(u, u_ref)
    torch.testing.assert_close(u_tgt, v - (t - r)[:, None, None] * dudt, atol=1e-10, rtol=1e-8)
    assert torch.equal(u_tgt[r == t], v[r == t]) and not torch.equal(u_tgt[r < t], v[r < t])
    assert u.requires_grad and not u_tgt.requires_grad
    ((u - u_tgt) ** 2).mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    _, all_equal = flow.meanflow_target(u_fn, z, t, t, v, cond)  # every row r = t: no jvp at all, target v
    torch.testing.assert_close(all_equal, v, atol=0, rtol=0)


def test_meanflow_sampling_is_exact_for_the_true_average_velocity() -> None:
    eps = torch.randn(4, 2, 2, generator=torch.Generator().manual_seed(0))

    def u_true(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (z - A0) / t[:, None, None]  # straight paths: u(z_t, r, t) = v for every r

    for steps in (1, 3):
        torch.testing.assert_close(flow.meanflow_sample(u_true, eps, flow.time_grid(steps)), A0.expand(4, -1, -1))


def test_adaptive_weighting() -> None:
    u, tgt = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.zeros(2, 2)
    torch.testing.assert_close(flow.meanflow_loss(u, tgt, 0.0), torch.tensor(1.25))  # plain MSE
    expected = (5 / (5 + 1e-3) + 0) / 2  # sg(1 / (||d||^2 + c)) ||d||^2, averaged over samples
    torch.testing.assert_close(flow.meanflow_loss(u, tgt, 1.0), torch.tensor(expected))


def test_meanflow_one_step_sample_is_noise_minus_average_velocity() -> None:
    policy = tiny_policy()
    obs = obs_for(policy)
    noise = torch.randn(3, 8, 2, generator=torch.Generator().manual_seed(2))
    cond = policy.encode_obs(obs)
    u = policy.average_velocity(noise, torch.zeros(3), torch.ones(3), cond)
    expected = policy.normalizer.unnormalize("action", (noise - u).clamp(-1, 1))
    torch.testing.assert_close(policy.predict_action_chunk(obs, noise=noise), expected)
    # two steps: z_0.5 = eps - 0.5 u(eps, 0.5, 1), a = z_0.5 - 0.5 u(z_0.5, 0, 0.5)
    policy2 = tiny_policy(num_inference_steps=2)
    z = noise - 0.5 * policy2.average_velocity(noise, torch.full((3,), 0.5), torch.ones(3), cond)
    z = z - 0.5 * policy2.average_velocity(z, torch.zeros(3), torch.full((3,), 0.5), cond)
    expected = policy2.normalizer.unnormalize("action", z.clamp(-1, 1))
    torch.testing.assert_close(policy2.predict_action_chunk(obs, noise=noise), expected)


def test_meanflow_denoise_is_the_instantaneous_velocity() -> None:
    policy = tiny_policy()
    cond = policy.encode_obs(obs_for(policy))
    x, t = torch.randn(3, 8, 2), torch.rand(3)
    torch.testing.assert_close(policy.denoise(x, t, cond), policy.average_velocity(x, t, t, cond))


def test_meanflow_loss_backward_and_no_grad_validation() -> None:
    policy = tiny_policy(adaptive_weight_power=1.0).train()
    g = torch.Generator().manual_seed(1)
    batch = {"obs": obs_for(policy), "action": torch.rand(3, 8, 2, generator=g) * 300 + 100}
    loss, logs = policy.compute_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and policy.model.step_encoder2[1].weight.grad.abs().sum() > 0
    with torch.no_grad():  # the Trainer's validation loss runs under no_grad: the jvp must still work
        val, _ = policy.compute_loss(batch)
    assert torch.isfinite(val)


def test_meanflow_logs_the_unweighted_error_beside_the_adaptive_loss() -> None:
    g = torch.Generator().manual_seed(1)
    losses = {}
    for p in (0.0, 1.0):
        policy = tiny_policy(adaptive_weight_power=p).train()
        batch = {"obs": obs_for(policy), "action": torch.rand(3, 8, 2, generator=g) * 300 + 100}
        torch.manual_seed(2)
        loss, logs = policy.compute_loss(batch)
        losses[p] = (loss.item(), logs["flow_mse"].item())
    assert losses[0.0][0] == pytest.approx(losses[0.0][1])  # p = 0: the loss is the MSE itself
    # p = 1: each sample's error divided by itself (+ 1e-3), so the loss is at most 1 while the MSE is not
    assert losses[1.0][0] <= 1.0 and losses[1.0][0] != pytest.approx(losses[1.0][1])
    assert MeanFlowConfig().adaptive_weight_power == 1.0  # the paper's weighting is the default


def test_meanflow_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="ratio_r_neq_t must be in \\[0, 1\\], got 1.5"):
        MeanFlowConfig(ratio_r_neq_t=1.5)
    with pytest.raises(ValueError, match="time_distribution must be one of"):
        MeanFlowConfig(time_distribution="beta")
    with pytest.raises(ValueError, match="adaptive_weight_power must be >= 0"):
        MeanFlowConfig(adaptive_weight_power=-1)


# -- the UNet's optional second time embedding -------------------------------------------------------------------
def small_unet(**kwargs) -> ConditionalUnet1D:
    torch.manual_seed(0)
    return ConditionalUnet1D(2, 10, 16, (16, 32, 64), 3, **kwargs)


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 8, 2, generator=g), torch.randint(0, 100, (3,), generator=g), torch.randn(3, 10, generator=g)


def test_unet_without_second_embedding_is_unchanged() -> None:
    net = small_unet()
    assert not any(k.startswith("step_encoder2") for k in net.state_dict())
    torch.testing.assert_close(net.state_dict(), small_unet(second_time_embed=False).state_dict(), rtol=0, atol=0)
    out = net(*unet_inputs())
    # Golden values computed with the UNet before the second embedding existed (same seed, same inputs).
    golden = torch.tensor([[0.09002716839313507, -0.48905205726623535], [-0.07117028534412384, 0.4098922908306122]])
    torch.testing.assert_close(out[0, :2], golden, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.sum(), torch.tensor(3.5548462867736816), atol=1e-5, rtol=1e-6)


def test_unet_second_embedding_adds_only_its_own_parameters() -> None:
    base, two = small_unet().state_dict(), small_unet(second_time_embed=True).state_dict()
    extra = sorted(set(two) - set(base))
    assert extra == [f"step_encoder2.{i}.{p}" for i in (1, 3) for p in ("bias", "weight")]
    assert all(torch.equal(base[k], two[k]) for k in base)  # built last: the shared weights draw the same values
    net = small_unet(second_time_embed=True)
    x, t, c = unet_inputs()
    out = net(x, t, c, timestep2=t * 0.5)
    assert not torch.allclose(out, net(x, t, c, timestep2=t * 0.25))  # the second time conditions the output
    with pytest.raises(ValueError, match="timestep2 must be given exactly when"):
        net(x, t, c)
    with pytest.raises(ValueError, match="timestep2 must be given exactly when"):
        small_unet()(x, t, c, timestep2=t)
    with pytest.raises(ValueError, match=r"timestep2 must be an int, \[B\] or \[B, T\]"):
        net(x, t, c, timestep2=torch.zeros(3, 4))
