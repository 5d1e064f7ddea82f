"""TransformerForDiffusion and the diffusion_transformer policy: shapes, DP's causal masks, conditioning,
config validation and a tiny overfit."""

import pytest
import torch

from data.pusht import shape_meta
from policies.diffusion_transformer import DiffusionTransformerConfig
from policies.networks.transformer import TransformerForDiffusion
from policies.registry import make_policy

B, H, TO, DA, DOBS = 3, 8, 4, 2, 5


def small_net(**kwargs) -> TransformerForDiffusion:
    torch.manual_seed(0)
    args = {"n_layer": 2, "n_head": 2, "n_emb": 16, "p_drop_attn": 0.0} | kwargs
    net = TransformerForDiffusion(DA, DA, H, TO, DOBS, **args).eval()
    # DP's N(0, 0.02) initialisation makes every cross-token effect tiny at first; larger random weights make
    # the structural (mask) properties below visible well above float tolerance
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(std=0.3)
    return net


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(B, H, DA, generator=g)  # [B, H, Da]
    t = torch.randint(0, 100, (B,), generator=g)  # [B]
    cond = torch.randn(B, TO, DOBS, generator=g)  # [B, To, D_obs]
    return sample, t, cond


@pytest.mark.parametrize("n_cond_layers", [0, 2])
def test_output_shape_and_int_timestep(n_cond_layers: int) -> None:
    net = small_net(n_cond_layers=n_cond_layers)
    sample, _, cond = inputs()
    out = net(sample, 7, cond)
    assert out.shape == (B, H, DA)
    assert torch.allclose(out, net(sample, torch.full((B,), 7), cond))


def test_bad_inputs_raise_with_the_expected_values() -> None:
    net = small_net()
    sample, t, cond = inputs()
    with pytest.raises(ValueError, match=r"sample must be \[B, 8, 2\], got \(3, 6, 2\)"):
        net(sample[:, :6], t, cond)
    with pytest.raises(ValueError, match=r"cond must be \[B, 4, 5\] = \(3, 4, 5\), got \(3, 2, 5\)"):
        net(sample, t, cond[:, :2])
    with pytest.raises(ValueError, match=r"timestep must be an int or \[B\] = \(3,\), got \(3, 8\)"):
        net(sample, torch.zeros(B, H, dtype=torch.long), cond)
    with pytest.raises(ValueError, match="cond_dim must be >= 1, got 0"):
        TransformerForDiffusion(DA, DA, H, TO, 0)


@pytest.mark.parametrize("j", [1, 3, 6])
def test_causal_attention_hides_later_actions_and_observations(j: int) -> None:
    sample, t, cond = inputs()
    changed_sample, changed_cond = sample.clone(), cond.clone()
    changed_sample[:, j:] += 1.0  # action tokens j, j+1, ..
    changed_cond[:, j:] += 1.0  # observation tokens j, j+1, .. (none when j >= To)
    causal = small_net(causal_attn=True)
    before, after = causal(sample, t, cond), causal(changed_sample, t, changed_cond)
    assert torch.allclose(before[:, :j], after[:, :j], atol=1e-6)
    assert not torch.allclose(before[:, j:], after[:, j:], atol=1e-4)
    full = small_net(causal_attn=False)
    assert not torch.allclose(full(sample, t, cond)[:, :j], full(changed_sample, t, changed_cond)[:, :j], atol=1e-4)


def test_observation_token_reaches_actions_from_its_own_step_on() -> None:
    sample, t, cond = inputs()
    changed = cond.clone()
    changed[:, 2] += 1.0  # only observation step 2
    net = small_net()
    before, after = net(sample, t, cond), net(sample, t, changed)
    assert torch.allclose(before[:, :2], after[:, :2], atol=1e-6)
    assert not torch.allclose(before[:, 2:], after[:, 2:], atol=1e-4)


def test_diffusion_step_token_matters() -> None:
    net = small_net()
    sample, _, cond = inputs()
    assert not torch.allclose(net(sample, 3, cond), net(sample, 90, cond), atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_emb": 130, "n_head": 4}, "n_emb must be divisible by n_head=4, got 130"),
        ({"n_emb": 7, "n_head": 1}, "n_emb must be even and >= 4, got 7"),
        ({"n_layer": 0}, "n_layer must be >= 1, got 0"),
        ({"n_head": 0}, "n_head must be >= 1, got 0"),
        ({"n_cond_layers": -1}, "n_cond_layers must be >= 0, got -1"),
        ({"p_drop_attn": 1.0}, r"p_drop_attn must be in \[0, 1\), got 1.0"),
        ({"p_drop_emb": -0.1}, r"p_drop_emb must be in \[0, 1\), got -0.1"),
        ({"sampler": "euler"}, "sampler must be one of"),
        ({"num_inference_steps": 101}, r"num_inference_steps must be in \[1, num_train_timesteps=100\], got 101"),
        ({"prediction_type": "v"}, r"prediction_type must be one of \('epsilon', 'sample'\), got 'v'"),
    ],
)
def test_bad_config_values_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DiffusionTransformerConfig(**kwargs)


def test_paper_size_is_reachable() -> None:
    config = DiffusionTransformerConfig(n_layer=8, n_head=4, n_emb=256, p_drop_attn=0.3)
    net = make_policy(config, shape_meta("state")).model
    assert 8.5e6 < sum(p.numel() for p in net.parameters()) < 9.5e6  # DP's Push-T transformer: 9 M


def test_tiny_policy_overfits_a_fixed_batch() -> None:
    torch.manual_seed(0)
    config = DiffusionTransformerConfig(n_layer=2, n_head=2, n_emb=32, horizon=8, n_action_steps=4)
    policy = make_policy(config, shape_meta("state"))
    g = torch.Generator().manual_seed(1)
    batch = {"obs": {"state": torch.rand(16, 2, 20, generator=g)}, "action": torch.rand(16, 8, 2, generator=g)}
    policy.fit_normalizer({"state": batch["obs"]["state"].flatten(0, 1), "action": batch["action"].flatten(0, 1)})
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        torch.manual_seed(2)  # the same noise and levels every step: a truly fixed regression problem
        loss, _ = policy.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_prediction_type_sets_the_regression_target_and_denoise_returns_epsilon(prediction_type: str) -> None:
    """The loss regresses the network output onto epsilon or onto the clean normalized chunk; ``denoise``
    returns epsilon either way (a clean-sample output x0 as (x_t - sqrt(abar) x0) / sqrt(1 - abar))."""
    config = DiffusionTransformerConfig(
        n_layer=1, n_head=2, n_emb=16, horizon=8, n_action_steps=4, prediction_type=prediction_type
    )
    policy = make_policy(config, shape_meta("state"))
    g = torch.Generator().manual_seed(1)
    batch = {"obs": {"state": torch.rand(4, 2, 20, generator=g)}, "action": torch.rand(4, 8, 2, generator=g) * 100}
    policy.fit_normalizer({"state": batch["obs"]["state"].flatten(0, 1), "action": batch["action"].flatten(0, 1)})
    clean = policy.normalizer.normalize("action", batch["action"])
    torch.manual_seed(3)
    noise = torch.randn_like(clean)
    policy.network = lambda x_t, t, cond: torch.zeros_like(x_t)  # type: ignore[method-assign]
    torch.manual_seed(3)  # compute_loss draws the same noise first
    loss, _ = policy.compute_loss(batch)
    target = noise if prediction_type == "epsilon" else clean
    assert loss.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-6)

    x0 = torch.randn(4, 8, 2, generator=g)
    x_t, t = torch.randn(4, 8, 2, generator=g), torch.tensor([0, 10, 50, 99])
    policy.network = lambda x_t, t, cond: x0  # type: ignore[method-assign]
    eps = policy.denoise(x_t, t, None)
    if prediction_type == "epsilon":
        assert torch.equal(eps, x0)
    else:  # the epsilon that maps back to the predicted clean chunk
        policy.schedule.clip_sample = False
        torch.testing.assert_close(policy.schedule.predict_x0(x_t, eps, t), x0, atol=1e-4, rtol=1e-4)
