"""OFQL: chunk-level TD target, critic/actor gradient separation, Polyak targets, alpha normalization, contract."""

from __future__ import annotations

import copy

import pytest
import torch

from data.pusht import shape_meta
from policies.checkpoint import load_policy, save_checkpoint
from policies.ofql import OFQLConfig, chunk_td_target
from policies.registry import make_policy

B, H, TA = 3, 8, 3


def tiny(**overrides):
    torch.manual_seed(0)
    cfg = OFQLConfig(
        horizon=H,
        n_action_steps=TA,
        down_dims=[16, 32],
        diffusion_step_embed_dim=16,
        kernel_size=3,
        critic_hidden_dims=[32, 32],
        **overrides,
    )
    policy = make_policy(cfg, shape_meta("state"))
    policy.fit_normalizer({"state": torch.rand(64, 20) * 400 + 50, "action": torch.rand(64, 2) * 300 + 100})
    return policy


def transition_batch(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "obs": {"state": torch.rand(B, 2, 20, generator=g) * 400 + 50},
        "action": torch.rand(B, H, 2, generator=g) * 300 + 100,
        "next_obs": {"state": torch.rand(B, 2, 20, generator=g) * 400 + 50},
        "reward": torch.rand(B, TA, generator=g),
        "terminal": torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]),
    }


def set_constant(qf: torch.nn.Module, value: float) -> None:
    """Q(s, a) = value for every input: all weights zero, the output bias = value."""
    with torch.no_grad():
        for p in qf.parameters():
            p.zero_()
        qf.net[-1].bias.fill_(value)


def test_chunk_td_target_by_hand() -> None:
    reward = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 99.0], [4.0, 99.0, 99.0]])
    terminal = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # after the first terminal: padding
    next_q = torch.tensor([10.0, 10.0, 10.0])
    target = chunk_td_target(reward, terminal, next_q, discount=0.5)
    # no terminal: 1 + .5 + .25 + .5^3 * 10; terminal at step 1: 1 + .5 * 2; terminal at step 0: 4
    torch.testing.assert_close(target, torch.tensor([3.0, 2.0, 4.0]))


def test_policy_td_target_uses_min_of_target_critics() -> None:
    policy = tiny(discount=0.5)
    set_constant(policy.qf1_target, 6.0)
    set_constant(policy.qf2_target, 2.0)
    set_constant(policy.qf1, -100.0)  # the online critics must not enter the target
    batch = transition_batch()
    reward = torch.ones(B, TA)
    target = policy.td_target(batch["next_obs"], reward, batch["terminal"])
    # R: 1.75 (no terminal) + .125 * min(6, 2); 1.5 (terminal at step 1); 1 (terminal at step 0)
    torch.testing.assert_close(target, torch.tensor([1.75 + 0.25, 1.5, 1.0]))
    assert not target.requires_grad


def test_q_bounds_clamp_the_td_target_and_layer_norm_critics() -> None:
    policy = tiny(discount=0.5, q_bounds=[0.0, 1.8], critic_layer_norm=True)
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in policy.qf1.net) == 2  # one per hidden layer
    for qf in (policy.qf1_target, policy.qf2_target):
        set_constant(qf, 6.0)
    batch = transition_batch()
    # unclamped: 1.75 + .125 * 6 = 2.5 (clamped to 1.8); 1.5; 1 -> and a negative reward clamps up to 0
    target = policy.td_target(batch["next_obs"], torch.ones(B, TA), batch["terminal"])
    torch.testing.assert_close(target, torch.tensor([1.8, 1.5, 1.0]))
    target = policy.td_target(batch["next_obs"], -torch.ones(B, TA), batch["terminal"])
    torch.testing.assert_close(target, torch.zeros(B))
    with pytest.raises(ValueError, match=r"q_bounds must be null or \[lo, hi\]"):
        OFQLConfig(q_bounds=[1.0, 0.0])


def test_actor_term_sends_no_gradient_into_the_critic() -> None:
    policy = tiny()
    cond = policy.encode_obs(transition_batch()["obs"])
    q_pi = policy.actor_q(cond, policy.sample_normalized(cond, torch.randn(B, H, 2)))
    (-q_pi.mean()).backward()
    assert all(p.grad is None for qf in (policy.qf1, policy.qf2) for p in qf.parameters())
    assert policy.model.final[1].weight.grad.abs().sum() > 0  # ... but reaches the actor
    # In the full loss, the critics' gradients do not depend on the actor weight eta.
    grads = {}
    for eta in (0.0, 5.0):
        p = tiny(eta=eta)
        torch.manual_seed(7)
        p.compute_loss(transition_batch())[0].backward()
        grads[eta] = p
    for name, param in grads[0.0].named_parameters():
        other = dict(grads[5.0].named_parameters())[name]
        if name.startswith("qf"):
            torch.testing.assert_close(param.grad, other.grad, rtol=0, atol=0)
    assert not torch.equal(grads[0.0].model.final[1].weight.grad, grads[5.0].model.final[1].weight.grad)


def test_alpha_normalizes_by_the_mean_absolute_q() -> None:
    policy = tiny(eta=0.3)
    set_constant(policy.qf1, -4.0)
    set_constant(policy.qf2, 2.0)
    _, logs = policy.compute_loss(transition_batch())
    torch.testing.assert_close(logs["q_pi"], torch.tensor(-4.0))  # min over the two heads
    torch.testing.assert_close(logs["alpha"], torch.tensor(0.3 / 4.0))
    flow_and_actor = logs["flow_loss"] - logs["alpha"] * logs["q_pi"]
    torch.testing.assert_close(logs["loss"], logs["critic_loss"] + flow_and_actor)


def test_target_critics_follow_by_polyak_after_each_optimizer_step() -> None:
    policy = tiny(tau=0.1)
    targets = [p.detach().clone() for p in policy.qf1_target.parameters()]
    assert all(not p.requires_grad for p in [*policy.qf1_target.parameters(), *policy.qf2_target.parameters()])
    with torch.no_grad():
        for p in policy.qf1.parameters():
            p.add_(1.0)
    online = [p.detach().clone() for p in policy.qf1.parameters()]
    policy.after_optimizer_step()
    for new, old, on in zip(policy.qf1_target.parameters(), targets, online, strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * on)
    for tgt, on in zip(policy.qf2_target.parameters(), policy.qf2.parameters(), strict=True):
        torch.testing.assert_close(tgt, on)  # qf2 did not move: its target stays equal


def test_loss_backward_reaches_every_trainable_parameter() -> None:
    policy = tiny().train()
    loss, logs = policy.compute_loss(transition_batch())
    assert torch.isfinite(loss) and {"flow_loss", "critic_loss", "q_pi", "alpha"} <= set(logs)
    loss.backward()
    for name, p in policy.named_parameters():
        if name.startswith(("qf1_target", "qf2_target")):
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_actor_and_critics_are_clipped_as_separate_groups() -> None:
    policy = tiny()
    actor, critics = policy.grad_clip_groups()
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(critics) == ids([*policy.qf1.parameters(), *policy.qf2.parameters()])
    assert not ids(actor) & ids(critics)
    assert ids(actor) | ids(critics) == ids(policy.parameters())
    assert ids(policy.model.parameters()) <= ids(actor)


def test_batch_is_not_mutated() -> None:
    policy = tiny()
    batch = transition_batch()
    before = copy.deepcopy(batch)
    policy.compute_loss(batch)
    for key in ("action", "reward", "terminal"):
        assert torch.equal(batch[key], before[key])
    for key in ("obs", "next_obs"):
        assert torch.equal(batch[key]["state"], before[key]["state"])


def test_save_load_and_determinism(tmp_path) -> None:
    policy = tiny().eval()
    obs = transition_batch()["obs"]
    noise = torch.randn(B, H, 2, generator=torch.Generator().manual_seed(2))
    expected = policy.predict_action_chunk(obs, noise=noise)
    assert torch.equal(policy.predict_action_chunk(obs, noise=noise.clone()), expected)
    assert not torch.equal(policy.predict_action_chunk(obs, noise=noise + 1), expected)
    loaded = load_policy(save_checkpoint(policy, tmp_path / "ckpt"))
    assert torch.equal(loaded.predict_action_chunk(obs, noise=noise), expected)
    for name, value in policy.state_dict().items():  # target critics are saved too
        assert torch.equal(loaded.state_dict()[name], value), name
    assert any(k.startswith("qf1_target.") for k in policy.state_dict())


def test_missing_or_bad_transitions_give_clear_errors() -> None:
    policy = tiny()
    batch = transition_batch()
    with pytest.raises(
        ValueError, match=r"ofql needs transitions: the batch lacks \['next_obs', 'reward', 'terminal'\]"
    ):
        policy.compute_loss({"obs": batch["obs"], "action": batch["action"]})
    with pytest.raises(ValueError, match=r"batch 'reward' has shape \[3, 8\], expected \[3, 3\]"):
        policy.compute_loss({**batch, "reward": torch.zeros(B, 8)})
    with pytest.raises(ValueError, match="batch 'next_obs': observation 'state' has shape"):
        policy.compute_loss({**batch, "next_obs": {"state": torch.zeros(B, 2, 19)}})
    with pytest.raises(ValueError, match="batch 'terminal' contains NaN or inf"):
        policy.compute_loss({**batch, "terminal": torch.full((B, TA), float("nan"))})
    with pytest.raises(ValueError, match="tau must be in \\(0, 1\\], got 0.0"):
        OFQLConfig(tau=0.0)
    assert OFQLConfig.needs_transitions and not OFQLConfig.__mro__[1].needs_transitions
