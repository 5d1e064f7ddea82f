"""Golden values and behaviour of the DDPM schedule and DDIM/DDPM samplers (k = 0 clean .. K-1 noisiest)."""

import numpy as np
import pytest
import torch

from policies.schedulers import DDPMSchedule

K = 100


def cosine_f(t: np.ndarray | float) -> np.ndarray:
    """Nichol & Dhariwal 2021 eq. 17, written independently: abar(t) = f(t) / f(0), t in [0, 1]."""
    return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2


def cosine_abar_numpy(num_timesteps: int) -> np.ndarray:
    """abar_k = prod_{i<=k} (1 - beta_i) with beta_i = 1 - f((i+1)/K) / f(i/K) capped at 0.999."""
    k = np.arange(num_timesteps)
    betas = np.minimum(1 - cosine_f((k + 1) / num_timesteps) / cosine_f(k / num_timesteps), 0.999)
    return np.cumprod(1 - betas)


@pytest.fixture
def sched() -> DDPMSchedule:
    return DDPMSchedule(num_train_timesteps=K)


def test_cosine_alphas_cumprod_golden(sched: DDPMSchedule) -> None:
    for k in (0, 1, 10, 49, 98):  # uncapped levels: the product telescopes to f((k+1)/K) / f(0)
        assert sched.alphas_cumprod[k].item() == pytest.approx(cosine_f((k + 1) / K) / cosine_f(0), rel=1e-5)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), cosine_abar_numpy(K), rtol=1e-5)
    golden = {0: 0.999368718, 1: 0.998252486, 49: 0.493843590, 98: 2.42857228e-04, 99: 2.42857228e-07}
    for k, value in golden.items():
        assert sched.alphas_cumprod[k].item() == pytest.approx(value, rel=1e-5)
    assert sched.betas[-1].item() == pytest.approx(0.999)  # the cap binds at the last level only
    assert (sched.betas[:-1] < 0.999).all()
    torch.testing.assert_close(sched.alphas, 1 - sched.betas)


@pytest.mark.parametrize(
    ("schedule", "betas"),
    [
        ("linear", np.linspace(1e-4, 0.02, K)),
        ("scaled_linear", np.linspace(1e-4**0.5, 0.02**0.5, K) ** 2),  # linear in sqrt(beta)
    ],
)
def test_linear_schedules(schedule: str, betas: np.ndarray) -> None:
    s = DDPMSchedule(K, beta_schedule=schedule, beta_start=1e-4, beta_end=0.02)
    np.testing.assert_allclose(s.betas.numpy(), betas, rtol=1e-6)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-5)


def test_buffers_follow_module_but_are_not_saved(sched: DDPMSchedule) -> None:
    assert sched.state_dict() == {}
    assert sched.to(torch.float64).alphas_cumprod.dtype == torch.float64


def test_add_noise_per_sample_and_per_action(sched: DDPMSchedule) -> None:
    abar = cosine_abar_numpy(K)
    x0, noise = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    t = torch.tensor([0, 50, 99])  # [B]
    expected = np.sqrt(abar[t.numpy()])[:, None, None] * x0.numpy()
    expected += np.sqrt(1 - abar[t.numpy()])[:, None, None] * noise.numpy()
    np.testing.assert_allclose(sched.add_noise(x0, noise, t).numpy(), expected, rtol=1e-5, atol=1e-6)

    t_rows = torch.tensor([[0, 10, 20, 99], [5, 5, 5, 5], [99, 50, 1, 0]])  # [B, H]: one level per action
    a = abar[t_rows.numpy()][..., None]
    expected = np.sqrt(a) * x0.numpy() + np.sqrt(1 - a) * noise.numpy()
    np.testing.assert_allclose(sched.add_noise(x0, noise, t_rows).numpy(), expected, rtol=1e-5, atol=1e-6)
    # a constant [B, H] tensor is the per-sample case
    same = sched.add_noise(x0, noise, torch.full((3, 4), 5))
    torch.testing.assert_close(same, sched.add_noise(x0, noise, torch.full((3,), 5)))


def test_add_noise_rejects_bad_timesteps(sched: DDPMSchedule) -> None:
    x0 = torch.zeros(3, 4, 2)
    with pytest.raises(ValueError, match=r"t must be in \[0, 99\], got values in \[0, 100\]"):
        sched.add_noise(x0, x0, torch.tensor([0, 1, 100]))
    with pytest.raises(ValueError, match=r"t must be in \[0, 99\], got -1"):
        sched.add_noise(x0, x0, -1)
    with pytest.raises(ValueError, match=r"t must be an integer tensor of shape \[B\] or \[B, H\].*\(4,\)"):
        sched.add_noise(x0, x0, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="integer tensor"):
        sched.add_noise(x0, x0, torch.tensor([0.5, 1.0, 2.0]))


@pytest.mark.parametrize(
    ("t", "t_prev"),
    [
        (torch.tensor([3, 40, 99]), torch.tensor([1, 20, 0])),  # per sample
        (torch.tensor([[1, 7, 50, 99]] * 3), torch.tensor([[0, 3, 49, 10]] * 3)),  # per action
        (60, 20),
    ],
)
def test_ddim_with_true_noise_recovers_x0_and_intermediate_levels(sched: DDPMSchedule, t, t_prev) -> None:
    # float64: the identity is algebraic; in float32, recovering x0 at level 99 divides by
    # sqrt(abar_99) = 5e-4, which amplifies the rounding of x_t to ~1e-4
    sched = sched.double()
    x0 = torch.rand(3, 4, 2, dtype=torch.float64) * 1.8 - 0.9  # inside the clip range: clipping is inactive
    eps = torch.randn(3, 4, 2, dtype=torch.float64)
    x_t = sched.add_noise(x0, eps, t)
    torch.testing.assert_close(sched.step(x_t, eps, t, -1), x0, atol=1e-10, rtol=0)
    expected = sched.add_noise(x0, eps, t_prev)
    torch.testing.assert_close(sched.step(x_t, eps, t, t_prev), expected, atol=1e-10, rtol=0)


def test_ddim_eta1_single_step_is_ddpm_posterior(sched: DDPMSchedule) -> None:
    """Ho et al. 2020 eq. 6-7, computed independently with numpy (x0_hat clipped, as in diffusers' DDPM)."""
    abar = cosine_abar_numpy(K)
    x_t, eps = (
        torch.randn(4, 8, 2) * 2,
        torch.randn(4, 8, 2),
    )  # random eps: x0_hat leaves [-1, 1] and is clipped
    for k in (99, 50, 1, 0):
        a_t, a_prev = abar[k], (abar[k - 1] if k > 0 else 1.0)
        beta = 1 - a_t / a_prev
        x0_hat = np.clip((x_t.numpy() - np.sqrt(1 - a_t) * eps.numpy()) / np.sqrt(a_t), -1, 1)
        coef_x0, coef_xt = np.sqrt(a_prev) * beta / (1 - a_t), np.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)
        mean = coef_x0 * x0_hat + coef_xt * x_t.numpy()
        std = np.sqrt((1 - a_prev) / (1 - a_t) * beta)
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(k)).numpy()
        out = sched.step(x_t, eps, k, k - 1, eta=1.0, generator=torch.Generator().manual_seed(k))
        np.testing.assert_allclose(out.numpy(), mean + std * z, atol=5e-5, rtol=1e-5)


def test_predict_x0_clipping() -> None:
    x_t, eps = torch.full((1, 2, 1), 3.0), torch.zeros(1, 2, 1)
    abar_50 = cosine_abar_numpy(K)[50]
    unclipped = DDPMSchedule(K, clip_sample=False).predict_x0(x_t, eps, 50)
    torch.testing.assert_close(unclipped, torch.full_like(x_t, 3.0 / np.sqrt(abar_50)))
    assert (DDPMSchedule(K).predict_x0(x_t, eps, 50) == 1.0).all()
    assert (DDPMSchedule(K, clip_sample_range=2.5).predict_x0(-x_t, eps, 50) == -2.5).all()


def test_timesteps_golden_lists(sched: DDPMSchedule) -> None:
    assert sched.timesteps(1) == [99]
    assert sched.timesteps(2) == [99, 49]
    assert sched.timesteps(3) == [99, 66, 32]  # round((100 * 2/3)) - 1, round(100/3) - 1
    assert sched.timesteps(4) == [99, 74, 49, 24]
    assert sched.timesteps(10) == [99, 89, 79, 69, 59, 49, 39, 29, 19, 9]
    assert sched.timesteps(100) == list(range(99, -1, -1))
    assert sched.timesteps(5, start_t=49) == [49, 39, 29, 19, 9]
    assert sched.timesteps(1, start_t=30) == [30]
    assert sched.timesteps(11, start_t=10) == list(range(10, -1, -1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_inference_steps": 0}, r"num_inference_steps must be in \[1, 100\] for start_t=99, got 0"),
        ({"num_inference_steps": 101}, r"num_inference_steps must be in \[1, 100\] for start_t=99, got 101"),
        ({"num_inference_steps": 11, "start_t": 9}, r"must be in \[1, 10\] for start_t=9, got 11"),
        ({"num_inference_steps": 1, "start_t": 100}, r"start_t must be in \[0, 99\], got 100"),
        ({"num_inference_steps": 1, "start_t": -1}, r"start_t must be in \[0, 99\], got -1"),
    ],
)
def test_timesteps_bad_args(sched: DDPMSchedule, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sched.timesteps(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_train_timesteps": 0}, "num_train_timesteps must be >= 1, got 0"),
        ({"beta_schedule": "cosine"}, "beta_schedule must be one of .*, got 'cosine'"),
        ({"clip_sample_range": 0.0}, "clip_sample_range must be > 0, got 0.0"),
        (
            {"beta_schedule": "linear", "beta_start": 0.1, "beta_end": 0.01},
            "got beta_start=0.1, beta_end=0.01",
        ),
    ],
)
def test_schedule_bad_args(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DDPMSchedule(**kwargs)


def test_step_and_sample_bad_args(sched: DDPMSchedule) -> None:
    x = torch.zeros(2, 4, 2)
    with pytest.raises(ValueError, match="eta must be in \\[0, 1\\], got 1.5"):
        sched.step(x, x, 10, 5, eta=1.5)
    with pytest.raises(ValueError, match="t_prev must be lower than t"):
        sched.step(x, x, 10, 10)
    with pytest.raises(ValueError, match="t_prev must be lower than t"):
        sched.step(x, x, torch.tensor([10, 3]), torch.tensor([9, 5]))
    with pytest.raises(ValueError, match=r"t_prev must be in \[-1, 99\], got -2"):
        sched.step(x, x, 10, -2)
    eps_fn = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match=r"strictly descending list, got \[10, 20\]"):
        sched.sample(eps_fn, x, [10, 20])
    with pytest.raises(ValueError, match=r"strictly descending list, got \[\]"):
        sched.sample(eps_fn, x, [])
    with pytest.raises(ValueError, match=r"timesteps must be in \[0, 99\], got \[100, 50\]"):
        sched.sample(eps_fn, x, [100, 50])


def _fixed_denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed (not learned) eps predictor: x: [B, H, Da], t: [B] -> [B, H, Da]."""
    return torch.tanh(0.7 * x + 0.01 * t[:, None, None].float())


def test_sample_is_deterministic_given_noise(sched: DDPMSchedule) -> None:
    x_init = torch.randn(3, 8, 2, generator=torch.Generator().manual_seed(0))
    levels = sched.timesteps(10)
    out1 = sched.sample(_fixed_denoiser, x_init, levels)
    out2 = sched.sample(_fixed_denoiser, x_init.clone(), levels)
    assert torch.equal(out1, out2)
    assert not torch.allclose(out1, sched.sample(_fixed_denoiser, x_init + 0.1, levels))


def test_sample_with_eta_uses_the_generator(sched: DDPMSchedule) -> None:
    x_init = torch.randn(3, 8, 2)
    run = lambda seed: sched.sample(  # noqa: E731
        _fixed_denoiser, x_init, sched.timesteps(K), eta=1.0, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_sample_is_the_chain_of_steps_between_listed_levels(sched: DDPMSchedule) -> None:
    x_init, seen = torch.randn(2, 4, 3), []

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (2,) and t.dtype == torch.long
        seen.append(t[0].item())
        return _fixed_denoiser(x, t)

    out = sched.sample(denoise, x_init, [99, 49, 7])
    assert seen == [99, 49, 7]
    x = x_init
    for t, t_prev in [(99, 49), (49, 7), (7, -1)]:
        x = sched.step(x, _fixed_denoiser(x, torch.full((2,), t)), t, t_prev)
    torch.testing.assert_close(out, x)


@pytest.mark.parametrize(
    ("n", "eta", "start_t"),
    [(100, 1.0, None), (10, 0.0, None), (4, 0.0, 30), (1, 0.0, None)],
)
def test_sample_with_oracle_denoiser_returns_the_data_point(sched: DDPMSchedule, n, eta, start_t) -> None:
    """For data concentrated at one point x*, the exact eps is (x_t - sqrt(abar) x*) / sqrt(1 - abar); every
    sampler (DDPM, sparse DDIM, warm-started DDIM, one step) must then land on x*."""
    sched = sched.double()  # float64 so that one step from level 99 is exact too (see above)
    x_star = torch.tensor([[0.5, -0.25], [0.1, 0.9]], dtype=torch.float64).expand(3, 2, 2)

    def oracle(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = sched.alphas_cumprod[t][:, None, None]
        return (x - a.sqrt() * x_star) / (1 - a).sqrt()

    levels = sched.timesteps(n, start_t=start_t)
    x_init = torch.randn(3, 2, 2, dtype=torch.float64)
    if start_t is not None:  # warm start: a partially noised chunk at level start_t
        x_init = sched.add_noise(x_star, x_init, start_t)
    out = sched.sample(oracle, x_init, levels, eta=eta, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x_star, atol=1e-10, rtol=0)
