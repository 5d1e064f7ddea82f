"""ConditionalUnet1D: shapes, input validation, conditioning and per-sample independence."""

import pytest
import torch

from policies.networks import ConditionalUnet1D

B, DA, G = 3, 2, 10


def small_unet(**kwargs) -> ConditionalUnet1D:
    torch.manual_seed(0)
    defaults = {"diffusion_step_embed_dim": 16, "down_dims": (16, 32, 64), "kernel_size": 3}
    return ConditionalUnet1D(DA, G, **(defaults | kwargs))


def inputs(horizon: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(B, horizon, DA, generator=g)  # [B, T, Da]
    t = torch.randint(0, 100, (B,), generator=g)  # [B]
    cond = torch.randn(B, G, generator=g)  # [B, G]
    return sample, t, cond


@pytest.mark.parametrize(
    ("down_dims", "horizon"),
    [((16,), 5), ((16, 32), 2), ((16, 32), 10), ((16, 32, 64), 16), ((8, 16, 32, 64), 24)],
)
def test_output_shape(down_dims: tuple[int, ...], horizon: int) -> None:
    net = small_unet(down_dims=down_dims, n_groups=8)
    sample, t, cond = inputs(horizon)
    assert net(sample, t, cond).shape == (B, horizon, DA)


def test_bad_inputs_raise_with_the_expected_values() -> None:
    net = small_unet()
    sample, t, cond = inputs(8)
    with pytest.raises(ValueError, match="horizon must be divisible by 4, got 18"):
        net(torch.zeros(B, 18, DA), t, cond)
    with pytest.raises(ValueError, match=r"sample must be \[B, T, 2\], got \(3, 8, 5\)"):
        net(torch.zeros(B, 8, 5), t, cond)
    with pytest.raises(ValueError, match=r"global_cond must be \[B, 10\] = \(3, 10\), got \(3, 7\)"):
        net(sample, t, cond[:, :7])
    with pytest.raises(
        ValueError,
        match=r"timestep must be an int, \[B\] or \[B, T\] = \(3, 8\), got \(3, 4\)",
    ):
        net(sample, torch.zeros(B, 4, dtype=torch.long), cond)
    with pytest.raises(
        ValueError,
        match=r"down_dims must be non-empty multiples of n_groups=8, got \(16, 20\)",
    ):
        ConditionalUnet1D(DA, G, down_dims=(16, 20))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ConditionalUnet1D(DA, G, kernel_size=4)


def test_int_and_tensor_timesteps_agree() -> None:
    net = small_unet()
    sample, _, cond = inputs()
    out = net(sample, 7, cond)
    torch.testing.assert_close(net(sample, torch.tensor(7), cond), out)
    torch.testing.assert_close(net(sample, torch.full((B,), 7), cond), out)
    torch.testing.assert_close(net(sample, torch.full((B, 8), 7), cond), out)  # constant per-action levels


def test_per_action_timesteps_condition_each_position() -> None:
    net = small_unet()
    sample, _, cond = inputs(16)
    levels = torch.arange(16).repeat(B, 1)  # [B, T]
    out = net(sample, levels, cond)
    assert out.shape == (B, 16, DA)
    bumped = levels.clone()
    bumped[:, -1] = 99  # only the last action's level changes
    out_bumped = net(sample, bumped, cond)
    assert not torch.allclose(out_bumped[:, -1], out[:, -1])
    assert not torch.allclose(out_bumped, net(sample, torch.full((B,), 99), cond))


@pytest.mark.parametrize("cond_predict_scale", [True, False])
def test_gradients_reach_every_parameter(cond_predict_scale: bool) -> None:
    net = small_unet(cond_predict_scale=cond_predict_scale)
    sample, t, cond = inputs()
    out = net(sample, t, cond)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cond_predict_scale", [True, False])
def test_global_cond_and_timestep_change_the_output(cond_predict_scale: bool) -> None:
    net = small_unet(cond_predict_scale=cond_predict_scale)
    sample, t, cond = inputs()
    out = net(sample, t, cond)
    assert not torch.allclose(out, net(sample, t, cond + 1.0), atol=1e-4)
    assert not torch.allclose(out, net(sample, (t + 50) % 100, cond), atol=1e-4)


def test_parameter_count_golden() -> None:
    # Diffusion Policy's Push-T state config at reduced width: 2-D actions, 20-dim obs x 2 steps
    net = ConditionalUnet1D(input_dim=2, global_cond_dim=40, down_dims=(64, 128, 256))
    assert sum(p.numel() for p in net.parameters()) == 4_559_554


def test_samples_in_a_batch_are_independent() -> None:
    net = small_unet()
    sample, t, cond = inputs(8)
    out = net(sample, t, cond)
    for i in range(B):
        alone = net(sample[i : i + 1], t[i : i + 1], cond[i : i + 1])
        torch.testing.assert_close(alone, out[i : i + 1], atol=1e-5, rtol=1e-5)
    perturbed = sample.clone()
    perturbed[1:] += 5.0  # change every other sample; sample 0's output must not move
    torch.testing.assert_close(net(perturbed, t, cond)[0], out[0], atol=1e-5, rtol=1e-5)
