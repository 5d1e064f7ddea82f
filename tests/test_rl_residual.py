"""Residual RL (rl/residual_ppo.py, rl/residual_sac.py): the PPO and SAC pieces on hand-computed batches, the zero
start of the residual adapter, a frozen base through real rounds, resume state, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from data.pusht import shape_meta
from envs.executor import make_executor
from envs.tasks import TaskConfig
from policies.checkpoint import load_policy, save_checkpoint
from policies.registry import config_from_dict, make_policy
from rl.adapters import ResidualPolicy
from rl.env_loop import EnvLoop
from rl.methods import MethodContext
from rl.residual_ppo import ResidualPPOConfig, clipped_surrogate, compute_gae, residual_adapter
from rl.residual_sac import ResidualSACConfig, td_target, temperature_loss

# Tiny methods: small networks and batches so a round of 2 envs x 16 steps updates in milliseconds.
TINY_METHODS = {
    "residual_ppo": ResidualPPOConfig(hidden_dims=[16, 16], n_epochs=2, minibatch_size=16),
    "residual_sac": ResidualSACConfig(
        hidden_dims=[16, 16], buffer_size=1000, batch_size=16, learning_starts=8, updates_per_step=1.0
    ),
}
CLI_TINY = {
    "residual_ppo": ["rl.hidden_dims=[16,16]", "rl.n_epochs=2", "rl.minibatch_size=16"],
    "residual_sac": ["rl.hidden_dims=[16,16]", "rl.buffer_size=1000", "rl.batch_size=16", "rl.learning_starts=16"],
}


def tiny_base(seed: int = 0):
    """A tiny diffusion_unet (DDIM, 2 steps) with Push-T-like normalizer ranges (px in [0, 512])."""
    torch.manual_seed(seed)
    config = config_from_dict(
        "diffusion_unet",
        {
            "down_dims": [8, 16],
            "diffusion_step_embed_dim": 8,
            "horizon": 8,
            "n_action_steps": 4,
            "num_inference_steps": 2,
        },
    )
    base = make_policy(config, shape_meta("state"))
    base.fit_normalizer({"state": torch.rand(256, 20) * 512, "action": torch.rand(256, 2) * 412 + 50})
    return base.eval()


def make_loop(n_envs: int = 2, max_steps: int = 16, seed: int = 0) -> EnvLoop:
    return EnvLoop("state", n_envs, n_obs_steps=2, max_steps=max_steps, seed=seed)


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- PPO pieces ------------------------------------------------------------------------------------------------
def test_gae_with_termination_and_truncation_hand_computed():
    # gamma 0.9, lambda 0.5 (gamma * lambda = 0.45). Env 0 terminates at t=1 (t=2 is not live: garbage, ignored);
    # env 1 is truncated at t=2 and bootstraps from V(x_3) = -5.
    rewards = torch.tensor([[-1.0, -1.0], [-0.5, -1.0], [0.0, -1.0]])
    values = torch.tensor([[2.0, -2.0], [1.0, -3.0], [0.3, -4.0]])
    next_values = torch.tensor([[1.0, -3.0], [4.0, -4.0], [0.7, -5.0]])
    terminated = torch.tensor([[False, False], [True, False], [False, False]])
    done = torch.tensor([[False, False], [True, False], [False, True]])
    adv = compute_gae(rewards, values, next_values, terminated, done, gamma=0.9, gae_lambda=0.5)
    # env 0: delta_1 = -0.5 + 0 - 1 = -1.5 (no bootstrap, the garbage t=2 is cut off); A_0 = -2.1 + 0.45 * -1.5
    assert adv[1, 0].item() == pytest.approx(-1.5)
    assert adv[0, 0].item() == pytest.approx(-2.775)
    # env 1: delta_2 = -1 + 0.9 * -5 + 4 = -1.5; delta_1 = -1.6; delta_0 = -1.7
    assert adv[2, 1].item() == pytest.approx(-1.5)
    assert adv[1, 1].item() == pytest.approx(-1.6 + 0.45 * -1.5)
    assert adv[0, 1].item() == pytest.approx(-1.7 + 0.45 * (-1.6 + 0.45 * -1.5))


def test_clipped_surrogate_hand_computed():
    ratios = torch.tensor([1.5, 0.5, 1.0, 1.1])
    advantages = torch.tensor([1.0, 1.0, -2.0, -1.0])
    old = torch.tensor([-1.0, -2.0, 0.5, 0.0])
    pg_loss, approx_kl, clipfrac = clipped_surrogate(old + ratios.log(), old, advantages, clip_coef=0.2)
    # per sample max(-A r, -A clip(r, 0.8, 1.2)): -1.2 (clipped), -0.5, 2.0, 1.1
    assert pg_loss.item() == pytest.approx((-1.2 - 0.5 + 2.0 + 1.1) / 4)
    assert clipfrac.item() == pytest.approx(0.5)
    expected_kl = np.mean([(r - 1) - math.log(r) for r in (1.5, 0.5, 1.0, 1.1)])
    assert approx_kl.item() == pytest.approx(expected_kl, rel=1e-5)
    # the gradient flows only through unclipped samples: d/dlogp of -A r is -A r for samples 1, 2 (r=0.5), 3, 4
    new = (old + ratios.log()).requires_grad_(True)
    clipped_surrogate(new, old, advantages, 0.2)[0].backward()
    assert torch.allclose(new.grad, torch.tensor([0.0, -0.5, 2.0, 1.1]) / 4)


# -- SAC pieces ------------------------------------------------------------------------------------------------
def test_sac_td_target_hand_computed():
    y = td_target(
        rewards=torch.tensor([-1.0, -0.5]),
        terminated=torch.tensor([0.0, 1.0]),
        qf1_next_target=torch.tensor([2.0, 3.0]),
        qf2_next_target=torch.tensor([1.5, 4.0]),
        next_log_prob=torch.tensor([-1.0, 0.5]),
        alpha=0.2,
        gamma=0.9,
    )
    # min Q' - alpha log pi = 1.5 + 0.2 = 1.7 -> -1 + 0.9 * 1.7; the terminated transition keeps only its reward
    assert torch.allclose(y, torch.tensor([-1.0 + 0.9 * 1.7, -0.5]))


def test_temperature_update_hand_computed():
    log_alpha = torch.tensor(math.log(0.5), requires_grad=True)
    log_prob = torch.tensor([-1.0, -3.0])  # entropy 2 > target -2: alpha must go down
    loss = temperature_loss(log_alpha, log_prob, target_entropy=-2.0)
    assert loss.item() == pytest.approx(-0.5 * (-4.0))  # -alpha * mean(log pi + target)
    opt = torch.optim.Adam([log_alpha], lr=0.1)
    loss.backward()
    assert log_alpha.grad.item() == pytest.approx(2.0)  # d/dlog_alpha = -alpha * mean(...) = 2
    opt.step()  # Adam's first step moves by lr * sign(grad)
    assert log_alpha.item() == pytest.approx(math.log(0.5) - 0.1, abs=1e-6)
    # and with entropy below the target it goes up
    log_alpha.grad = None
    temperature_loss(log_alpha, torch.tensor([3.0]), target_entropy=-2.0).backward()
    assert log_alpha.grad.item() < 0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (lambda: ResidualPPOConfig(clip_coef=0.0), "clip_coef must be > 0, got 0.0"),
        (lambda: ResidualPPOConfig(gae_lambda=1.5), "gae_lambda must be in [0, 1], got 1.5"),
        (lambda: ResidualPPOConfig(target_kl=-0.1), "target_kl must be null or > 0, got -0.1"),
        (lambda: ResidualSACConfig(tau=2.0), "tau must be in (0, 1], got 2.0"),
        (lambda: ResidualSACConfig(updates_per_step=0.0), "updates_per_step must be > 0, got 0.0"),
        (lambda: ResidualSACConfig(lr=-1.0), "lr must be > 0, got -1.0"),
    ],
)
def test_bad_config_names_field_and_value(config, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config()


# -- the adapter -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("squash", [False, True], ids=["ppo", "sac"])
def test_zero_residual_equals_the_base_exactly(squash):
    base = tiny_base()
    adapter = residual_adapter(base, torch.device("cpu"), hidden_dims=[16], **({"squash": True} if squash else {}))
    assert not any(p.requires_grad for p in adapter.base.parameters())
    rng = np.random.default_rng(0)
    observations = [{"state": (rng.random((3, 20)) * 512).astype(np.float32)} for _ in range(9)]

    def rollout(policy) -> np.ndarray:
        """Actions of 9 evaluate-like steps (replans every 4) with the same sampling noise."""
        executor = make_executor("chunk", policy, 2, 4)
        executor.reset(3)
        torch.manual_seed(1)
        return np.stack([executor.act(obs) for obs in observations])

    expected = rollout(base)
    np.testing.assert_array_equal(rollout(adapter), expected)  # bit for bit, not just close
    obs = {"state": torch.rand(3, 2, 20) * 512}
    noise = torch.randn(3, 8, 2)
    assert torch.equal(adapter.predict_action_chunk(obs, noise=noise), base.predict_action_chunk(obs, noise=noise))

    # A constant residual b (zero weights, bias b) moves every executed action by residual_scale * f(b) normalized
    # units, f = tanh when squashed: the correction really is applied, per step.
    with torch.no_grad():
        adapter.actor[-1].bias.fill_(0.5)
    shift = adapter.config.residual_scale * (math.tanh(0.5) if squash else 0.5) / adapter.normalizer.action_scale
    np.testing.assert_allclose(rollout(adapter), expected + shift.numpy(), rtol=1e-5)


# -- methods through real rounds -------------------------------------------------------------------------------
def run_method(name: str, base, loop: EnvLoop, min_env_steps: int):
    method = TINY_METHODS[name].build(base, loop, MethodContext())
    logs: dict[str, float] = {}
    while loop.env_steps < min_env_steps:
        logs = method.iterate() or logs
    return method, logs


@pytest.mark.parametrize("name", list(TINY_METHODS))
def test_iterate_trains_the_residual_and_keeps_the_base_frozen(name):
    torch.manual_seed(0)
    base = tiny_base()
    given = state_of(base)
    loop = make_loop()
    try:
        method = TINY_METHODS[name].build(base, loop, MethodContext())
        adapter = method.adapter
        assert isinstance(adapter, ResidualPolicy)
        if name == "residual_sac":
            assert adapter.config.squash  # evaluation and deployment apply the tanh-squashed mean
        frozen = state_of(adapter.base)
        assert all(torch.equal(frozen[k], given[k]) for k in given)  # the base's weights and normalizer
        assert not any(p.requires_grad for p in adapter.base.parameters())
        actor = state_of(adapter.actor)
        logs: dict[str, float] = {}
        while loop.env_steps < 64:  # PPO: >= 2 rounds; SAC: 56 env steps of updates after an 8-step warm-up
            logs = method.iterate() or logs
        assert loop.episodes and all(e.length <= 16 for e in loop.episodes)
    finally:
        loop.close()
    assert all(np.isfinite(v) for v in logs.values())
    if name == "residual_ppo":
        assert {
            "train/policy_loss",
            "train/value_loss",
            "train/entropy",
            "train/approx_kl",
            "train/clipfrac",
            "train/explained_variance",
        } <= set(logs)
    else:
        assert {"train/qf1_loss", "train/actor_loss", "train/alpha", "train/alpha_loss"} <= set(logs)
        assert method.buffer.size == loop.env_steps
    assert any(not torch.equal(actor[k], v) for k, v in adapter.actor.state_dict().items())  # it learned
    assert not any(p.requires_grad for p in adapter.base.parameters())
    after = state_of(adapter.base)
    assert all(torch.equal(after[k], frozen[k]) for k in frozen)  # bit-identical
    assert all(torch.equal(v, given[k]) for k, v in base.state_dict().items())  # the caller's base too


@pytest.mark.parametrize("name", list(TINY_METHODS))
def test_state_round_trip(name):
    torch.manual_seed(0)
    base = tiny_base()
    loop = make_loop()
    try:
        method = TINY_METHODS[name].build(base, loop, MethodContext())
        while loop.env_steps < 40:
            method.iterate()
        tensors, meta = method.state()
        # through what the runner writes (safetensors and JSON): nothing pickled, no storage shared with `method`
        tensors, meta = load_safetensors(save_safetensors(tensors)), json.loads(json.dumps(meta))
        restored = TINY_METHODS[name].build(base, loop, MethodContext())
        restored.adapter.load_state_dict(method.adapter.state_dict())
        restored.load_state(tensors, meta)
    finally:
        loop.close()
    tensors2, meta2 = restored.state()
    assert json.loads(json.dumps(meta2)) == meta and tensors2.keys() == tensors.keys()
    assert all(torch.equal(tensors2[k], tensors[k]) for k in tensors)
    if name == "residual_sac":
        assert restored.buffer.size == method.buffer.size > 0 and restored.log_alpha.item() == method.log_alpha.item()
        # the same minibatch and noise give the same update: optimizer moments, targets and temperature restored
        for m in (method, restored):
            torch.manual_seed(3)
            m.update()
        assert all(torch.equal(a, b) for a, b in zip(method.qf.parameters(), restored.qf.parameters(), strict=True))
        assert torch.equal(method.adapter.log_std, restored.adapter.log_std)


# -- CLI -------------------------------------------------------------------------------------------------------
def robodiff(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"robodiff {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TINY_METHODS))
def test_cli_adapt_saves_a_loadable_policy_and_resumes(name, tmp_path):
    base = tiny_base()
    base_dir = save_checkpoint(base, tmp_path / "base", {"task": dataclasses.asdict(TaskConfig(max_steps=16))})
    run_dir = tmp_path / "run"
    common = ["loop.eval_episodes=1", "loop.n_envs=2", "task.max_steps=16", "logger=none"]
    out = robodiff(
        "adapt",
        f"method={name}",
        f"base={base_dir}",
        "loop.total_env_steps=64",
        "loop.eval_at=[32]",
        *common,
        *CLI_TINY[name],
        f"run_dir={run_dir}",
    )
    assert out["method"] == name and out["env_steps"] >= 64
    latest = run_dir / "checkpoints" / "latest"
    adapted = load_policy(latest)
    assert isinstance(adapted, ResidualPolicy)
    if name == "residual_sac":
        assert adapted.config.squash
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in adapted.base.state_dict().items())  # frozen
    obs = {"state": torch.rand(2, 2, 20) * 512}
    assert adapted.predict_action_chunk(obs).shape == (2, 8, 2)
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval/score" in r]
    assert [r["policy"] for r in evals] == ["base", name, name] and evals[1]["step"] >= 32

    out = robodiff("adapt", f"resume={run_dir}", "loop.total_env_steps=96")
    assert out["env_steps"] >= 96
    saved = json.loads((latest / "config.json").read_text())
    assert saved["rl"]["method"] == name and saved["rl"]["env_steps"] == out["env_steps"]
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if "eval/score" in r][-1] == out["env_steps"]  # continued, base not re-run
    assert sum(r.get("policy") == "base" for r in evals) == 1
