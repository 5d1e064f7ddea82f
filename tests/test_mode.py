"""MoDE: EDM math, noise-only routing, load balancing, expert fusion and the expert cache."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.testing import assert_close

from data.pusht import shape_meta
from policies.edm import EDM, ddim_sample
from policies.mode import MoDEConfig, MoDEPolicy
from policies.networks.mode import NoiseRoutedMoE, Routing, load_balancing_loss, swiglu
from policies.registry import make_policy

TINY = {"embed_dim": 32, "n_layers": 2, "n_heads": 2, "expert_hidden_dim": 32}


def make(seed: int = 0, **overrides) -> MoDEPolicy:
    torch.manual_seed(seed)
    policy = make_policy(MoDEConfig(**{**TINY, **overrides}), shape_meta("state"))
    # Actions span exactly [-1, 1]: raw = normalized units, so tolerances are on the sampler's own scale.
    action = torch.cat([-torch.ones(1, 2), torch.ones(1, 2), torch.rand(62, 2) * 2 - 1])
    policy.fit_normalizer({"state": torch.rand(64, 20) * 400 + 50, "action": action})
    return policy.eval()


def obs_for(b: int = 3, seed: int = 1) -> dict:
    return {"state": torch.rand(b, 2, 20, generator=torch.Generator().manual_seed(seed)) * 400 + 50}


def noise_for(b: int = 3, seed: int = 2) -> torch.Tensor:
    return torch.randn(b, 16, 2, generator=torch.Generator().manual_seed(seed))


def batch_for(b: int = 8, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"obs": obs_for(b, seed), "action": torch.rand(b, 16, 2, generator=g) * 2 - 1}


def predict(policy: MoDEPolicy, cached: bool, obs: dict | None = None) -> torch.Tensor:
    policy.config = dataclasses.replace(policy.config, expert_cache=cached)
    return policy.predict_action_chunk(obs or obs_for(), noise=noise_for())


# -- EDM ---------------------------------------------------------------------------------------------------------
def test_edm_preconditioning_golden_values():
    edm = EDM(sigma_data=0.5)
    c_skip, c_out, c_in, c_noise = edm.scalings(torch.tensor([0.5, 80.0], dtype=torch.float64))
    # sigma = sigma_data: c_skip = 1/2, c_out = sd / sqrt(2), c_in = 1 / (sd sqrt(2)); sqrt(80^2 + 0.25) = 80.0015625..
    assert_close(c_skip, torch.tensor([0.5, 0.25 / 6400.25], dtype=torch.float64))
    assert_close(c_out, torch.tensor([0.25 / math.sqrt(0.5), 40 / math.sqrt(6400.25)], dtype=torch.float64))
    assert_close(c_in, torch.tensor([1 / math.sqrt(0.5), 1 / math.sqrt(6400.25)], dtype=torch.float64))
    assert_close(c_out, torch.tensor([0.35355339, 0.49999023], dtype=torch.float64), atol=1e-8, rtol=0)
    assert_close(c_in, torch.tensor([1.41421356, 0.01249976], dtype=torch.float64), atol=1e-8, rtol=0)
    assert_close(c_noise, torch.tensor([math.log(0.5) / 4, math.log(80) / 4], dtype=torch.float64))
    assert_close(edm.loss_weight(torch.tensor([0.5], dtype=torch.float64)), 1 / c_out[:1] ** 2)


def test_exponential_schedule_endpoints_and_monotonicity():
    sigmas = EDM().sigmas(10)
    assert len(sigmas) == 10 and sigmas[0] == pytest.approx(80.0) and sigmas[-1] == pytest.approx(1e-3)
    ratios = [b / a for a, b in zip(sigmas[:-1], sigmas[1:], strict=True)]
    assert all(r < 1 for r in ratios) and max(ratios) - min(ratios) < 1e-9  # equal steps in ln(sigma)
    assert EDM().sigmas(1) == [80.0]
    with pytest.raises(ValueError, match="num_steps must be >= 1, got 0"):
        EDM().sigmas(0)


def test_sigma_sampling_stays_in_range_and_centres_on_sigma_data():
    sigma = EDM().sample_sigma(200_000, generator=torch.Generator().manual_seed(0))
    assert sigma.dtype == torch.float32 and sigma.min() >= 1e-3 and sigma.max() <= 80
    assert sigma.median().item() == pytest.approx(0.5, rel=0.02)  # logistic in ln(sigma) around ln(sigma_data)


def test_edm_rejects_bad_levels():
    with pytest.raises(ValueError, match="sigma_min and sigma_max must satisfy"):
        EDM(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="sigma_data must be > 0, got 0"):
        EDM(sigma_data=0)


def test_ddim_step_golden_values():
    # D(x) = x / 2 at sigmas [2, 1] -> 0: x1 = D + (1/2)(x - D) = 0.75, then the last step returns D(x1) = 0.375.
    seen = []

    def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
        seen.append(i)
        return x / 2

    out = ddim_sample(denoise, torch.ones(1), [2.0, 1.0])
    assert_close(out, torch.tensor([0.375]))
    assert seen == [0, 1]
    with pytest.raises(ValueError, match="strictly descending"):
        ddim_sample(denoise, torch.ones(1), [1.0, 2.0])


# -- routing, load balancing, fusion -------------------------------------------------------------------------------
def test_load_balancing_loss_is_one_for_uniform_router_and_larger_when_collapsed():
    uniform = torch.full((16, 4), 0.25)
    experts = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0]]).repeat(4, 1)
    assert_close(load_balancing_loss(uniform, experts), torch.tensor(1.0))
    collapsed = torch.tensor([0.97, 0.01, 0.01, 0.01]).repeat(16, 1)
    collapsed_experts = torch.tensor([[0, 1]]).repeat(16, 1)
    assert load_balancing_loss(collapsed, collapsed_experts) > 1.9  # 4 * (0.5 * 0.97 + 0.5 * 0.01) = 1.96
    random_probs = torch.rand(16, 4, generator=torch.Generator().manual_seed(0)).softmax(-1)
    assert load_balancing_loss(random_probs, random_probs.topk(2).indices) >= 1.0


def test_router_output_does_not_depend_on_tokens():
    policy = make()
    model = policy.model
    c_noise = torch.full((3,), 0.3)
    g = torch.Generator().manual_seed(0)
    _, r1 = model(torch.randn(3, 16, 2, generator=g), c_noise, torch.randn(3, 3, 32, generator=g))
    _, r2 = model(torch.randn(3, 16, 2, generator=g) * 5, c_noise, torch.randn(3, 3, 32, generator=g))
    for a, b in zip(r1, r2, strict=True):
        assert torch.equal(a.probs, b.probs) and torch.equal(a.experts, b.experts)
        assert torch.equal(a.probs, a.probs[:1].expand_as(a.probs))  # one sigma -> one routing for the batch


def test_fused_swiglu_equals_weighted_sum_of_the_two_experts():
    torch.manual_seed(0)
    moe = NoiseRoutedMoE(dim=16, hidden_dim=8, num_experts=4, top_k=2)
    x = torch.randn(2, 5, 16)
    weights, experts = torch.tensor([0.7, 0.3]), torch.tensor([2, 0])
    expected = 0.7 * swiglu(x, moe.w13[2], moe.w2[2]) + 0.3 * swiglu(x, moe.w13[0], moe.w2[0])
    fused = moe.fuse(weights, experts)
    assert fused.w13.shape == (2 * 2 * 8, 16) and fused.w2.shape == (16, 2 * 8)
    assert_close(swiglu(x, *fused), expected, atol=1e-6, rtol=1e-5)
    # the sparse dispatch of the training path computes the same mixture
    routing = Routing(torch.zeros(2, 4), weights.repeat(2, 1), experts.repeat(2, 1))
    assert_close(moe(x, routing), expected, atol=1e-6, rtol=1e-5)


# -- expert cache --------------------------------------------------------------------------------------------------
def test_cached_equals_uncached_and_is_rebuilt_after_weight_updates():
    policy = make()
    before = predict(policy, cached=False)
    assert_close(predict(policy, cached=True), before, atol=1e-5, rtol=0)
    assert len(policy.build_expert_cache()) == 10 and len(policy.build_expert_cache(4)) == 4

    # an optimizer step changes the weights in place: the cache must follow
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    loss, _ = policy.compute_loss(batch_for())
    loss.backward()
    optimizer.step()
    policy.eval()
    after = predict(policy, cached=False)
    assert not torch.allclose(after, before, atol=1e-4)
    assert_close(predict(policy, cached=True), after, atol=1e-5, rtol=0)

    # load_state_dict copies into the parameters: the cache must follow again
    other = make(seed=5)
    policy.load_state_dict(other.state_dict())
    assert_close(predict(policy, cached=True), predict(other, cached=False), atol=1e-5, rtol=0)


def test_cache_is_reused_while_weights_are_unchanged():
    policy = make()
    first = policy.build_expert_cache()
    policy.predict_action_chunk(obs_for(), noise=noise_for())
    assert policy.build_expert_cache() is first
    # writes through .data are invisible to the version counter; clear_expert_cache forces the rebuild
    policy.model.blocks[0].moe.w2.data.mul_(2.0)
    policy.clear_expert_cache()
    assert_close(predict(policy, cached=True), predict(policy, cached=False), atol=1e-5, rtol=0)
    assert "_cache" not in "".join(policy.state_dict())  # derived data is never saved


def test_loss_logs_denoising_and_load_balancing_separately():
    policy = make().train()
    loss, logs = policy.compute_loss(batch_for())
    assert {"loss", "denoise_loss", "load_balancing_loss"} <= set(logs)
    assert logs["load_balancing_loss"] >= 1.0 - 1e-6
    assert_close(loss.detach(), logs["denoise_loss"] + 0.01 * logs["load_balancing_loss"])


# -- multi-task ----------------------------------------------------------------------------------------------------
def test_multitask_token_path():
    policy = make(n_tasks=3)
    obs = obs_for()
    by_task = [predict(policy, True, {**obs, "task": torch.full((3,), t)}) for t in range(3)]
    assert not torch.allclose(by_task[0], by_task[1]) and not torch.allclose(by_task[1], by_task[2])
    # [B, To] ids: the last step is used
    per_step = torch.tensor([[0, 2], [1, 2], [2, 2]])
    assert_close(predict(policy, True, {**obs, "task": per_step}), by_task[2])
    assert_close(predict(policy, False, {**obs, "task": per_step}), by_task[2], atol=1e-5, rtol=0)
    batch = batch_for(3)
    batch["obs"]["task"] = torch.tensor([0, 1, 2])
    loss, _ = policy.train().compute_loss(batch)
    loss.backward()
    assert policy.model.task_emb.weight.grad.abs().sum(dim=1).gt(0).all()


def test_multitask_errors():
    policy = make(n_tasks=3)
    with pytest.raises(ValueError, match=r"n_tasks=3 needs obs\['task'\]"):
        policy.predict_action_chunk(obs_for())
    with pytest.raises(ValueError, match=r"ids must be in \[0, 2\], got values in \[0, 3\]"):
        policy.predict_action_chunk({**obs_for(), "task": torch.tensor([0, 3, 1])})
    with pytest.raises(ValueError, match=r"integer tensor of shape \[B\] or \[B, To\] with B=3"):
        policy.predict_action_chunk({**obs_for(), "task": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"with B=3, got torch.int64 \[2\]"):
        policy.predict_action_chunk({**obs_for(), "task": torch.zeros(2, dtype=torch.long)})
    # a single-task policy needs no task id
    assert make().predict_action_chunk(obs_for(), noise=noise_for()).shape == (3, 16, 2)


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts=4\], got 5"):
        MoDEConfig(top_k=5)
    with pytest.raises(ValueError, match="embed_dim must be divisible by n_heads=4, got 30"):
        MoDEConfig(embed_dim=30)
    with pytest.raises(ValueError, match="n_tasks must be >= 1, got 0"):
        MoDEConfig(n_tasks=0)
    with pytest.raises(ValueError, match="sigma_min and sigma_max must satisfy"):
        MoDEConfig(sigma_min=100.0)
    with pytest.raises(ValueError, match="load_balancing_weight must be >= 0"):
        MoDEConfig(load_balancing_weight=-1.0)
