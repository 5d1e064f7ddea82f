"""World-model RL (rl/world_model.py) and DPPO (rl/dppo.py): the Push-T reward of keypoint states, the PETS ensemble,
imagined rollouts and termination, the Dyna cycle with both policy updates on a frozen base, resume state, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from envs.pusht import GOAL_POSE, PushTEnv, block_keypoints
from envs.tasks import TaskConfig, make_task
from policies.checkpoint import load_policy, save_checkpoint
from policies.diffusion_unet import DiffusionUnetConfig
from policies.registry import make_policy
from rl.dppo import DPPOConfig
from rl.dsrl import DSRLConfig
from rl.env_loop import EnvLoop
from rl.methods import MethodContext
from rl.world_model import (
    DynamicsEnsemble,
    ImaginedLoop,
    ModelVectorEnv,
    WorldModelConfig,
    block_pose,
    pusht_reward,
)

SHAPE_META = {"obs": {"state": [20]}, "action": [2]}


def tiny_base(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = DiffusionUnetConfig(
        horizon=8, n_obs_steps=2, n_action_steps=4, down_dims=[8, 16], diffusion_step_embed_dim=8, num_inference_steps=3
    )
    policy = make_policy(config, SHAPE_META)
    g = torch.Generator().manual_seed(seed)
    policy.fit_normalizer(
        {"state": torch.rand(64, 20, generator=g) * 512, "action": torch.rand(64, 2, generator=g) * 512}
    )
    return policy.eval()


def state_obs(agent_xy, block_pose_xya) -> np.ndarray:
    """A keypoint observation ``[20]`` for an agent position and a block pose (x, y, angle)."""
    return np.concatenate([block_keypoints(np.array([0, 0, *block_pose_xya])).reshape(-1), agent_xy]).astype(np.float32)


class CachedTask:
    """The Push-T task with its datasets loaded once for the module."""

    def __init__(self, task) -> None:
        self.task, self.cache = task, {}

    def datasets(self, *args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in self.cache:
            self.cache[key] = self.task.datasets(*args, **kwargs)
        return self.cache[key]

    def __getattr__(self, name):
        return getattr(self.task, name)


@pytest.fixture(scope="module")
def task(pusht_path):
    return CachedTask(make_task(TaskConfig(max_steps=20)))


TINY = dict(
    ensemble_size=2,
    hidden_dims=[32],
    model_batch_size=64,
    model_steps_per_cycle=10,
    real_steps_per_cycle=16,
    imagined_steps_per_cycle=24,
    imagined_envs=3,
    imagined_horizon=8,
    dppo=DPPOConfig(hidden_dims=[16], minibatch_size=16, update_epochs=1, actor_lr=1e-3, critic_warmup_rounds=0),
    dsrl=DSRLConfig(hidden_dims=[16], actor_hidden_dims=[16], batch_size=8, warmup_steps=8),
)


@pytest.fixture
def build(task):
    loops: list[EnvLoop] = []

    def make(policy_update: str = "dppo", base=None, budget: int | None = None, **fields):
        loop = EnvLoop("state", 2, 2, max_steps=20)
        loops.append(loop)
        config = WorldModelConfig(policy_update=policy_update, **(TINY | fields))
        context = MethodContext(task=task, env_step_budget=budget)
        return config.build(base if base is not None else tiny_base(), loop, context)

    yield make
    for loop in loops:
        loop.close()


# -- the known reward of keypoint states ------------------------------------------------------------------------
def test_block_pose_inverts_the_keypoints_and_the_reward_is_the_environments():
    rng = np.random.default_rng(0)
    poses = np.concatenate([rng.uniform(100, 400, (50, 2)), rng.uniform(-np.pi, np.pi, (50, 1))], axis=1)
    recovered = block_pose(block_keypoints(np.concatenate([np.zeros((50, 2)), poses], axis=1)))
    np.testing.assert_allclose(recovered, poses, atol=1e-9)
    reward, terminated = pusht_reward(np.stack([state_obs([50, 50], GOAL_POSE), state_obs([50, 50], [150, 150, 0])]))
    assert reward[0] == 1.0 and terminated.tolist() == [True, False] and 0 <= reward[1] < 0.5
    env = PushTEnv(max_steps=30)
    obs, _ = env.reset(seed=100000)
    for _ in range(20):
        obs, r, term, _, _ = env.step(rng.uniform(150, 350, 2))
        predicted, predicted_term = pusht_reward(obs["state"])
        assert abs(predicted - r) < 1e-4 and predicted_term == term


# -- the ensemble ---------------------------------------------------------------------------------------------------
def test_ensemble_nll_matches_the_gaussian_formula_and_log_variance_stays_bounded():
    model = DynamicsEnsemble(3, 2, [4], ensemble_size=2)
    for member, bias in zip(model.members, ([0.5, -0.5, 0.0, 0.0], [0.5, -0.5, 300.0, -300.0]), strict=True):
        torch.nn.init.zeros_(member[-1].weight)
        member[-1].bias.data = torch.tensor(bias)
    mean, logvar = model(torch.randn(5, 3))
    assert mean.shape == logvar.shape == (2, 5, 2)
    # A raw log-variance of 0 inside the bounds [-10, 0.5]: softplus bounds move it to 0.5 - softplus(0.5) etc.
    upper = 0.5 - math.log1p(math.exp(0.5))
    expected = -10 + math.log1p(math.exp(upper + 10))
    torch.testing.assert_close(logvar[0], torch.full((5, 2), expected))
    # Extreme outputs end at the (soft) bounds.
    torch.testing.assert_close(logvar[1], torch.tensor([0.5, -10.0]).expand(5, 2), atol=1e-4, rtol=0)
    target = torch.tensor([1.0, 0.0]).expand(2, 5, 2)
    # member 0: ((0.5-1)^2 e^-lv + lv, (-0.5-0)^2 e^-lv + lv); member 1 at the bounds; plus 0.01 (0.5*2 + 10*2)
    lv1 = logvar[1, 0]
    nll0 = 0.25 * math.exp(-expected) + expected
    nll1 = (0.25 * torch.exp(-lv1) + lv1).sum().item()
    loss = model.loss(torch.randn(2, 5, 3), target)
    assert loss.item() == pytest.approx((2 * nll0 + nll1) / 4 + 0.01 * 21.0, rel=1e-5)


def test_one_step_heldout_error_decreases_with_training(build):
    method = build(model_steps_per_cycle=0, lr=3e-3)
    x, y = method.transitions("heldout")
    assert len(x) > 100 and x.shape[1] == 2 * 20 + 2 and y.shape[1] == 20  # the demonstrations' validation episodes
    before = method.fit_model(0)["model/one_step_mse_heldout"]
    early = method.fit_model(100)["model/one_step_mse_heldout"]
    late = method.fit_model(200)["model/one_step_mse_heldout"]
    assert late < early < before and late < 0.5 * before


# -- imagination ----------------------------------------------------------------------------------------------------
def test_imagined_episode_ends_at_predicted_success_and_executes_no_more_steps():
    base = tiny_base()
    model = DynamicsEnsemble(2 * 20 + 2, 20, [8], ensemble_size=2)
    for member in model.members:  # a deterministic model: the agent moves by a fixed step, the block stays
        torch.nn.init.zeros_(member[-1].weight)
        member[-1].bias.data = torch.cat([torch.zeros(20), torch.full((20,), -60.0)])
    model.min_logvar.data.fill_(-60.0)
    model.target_mean[18:] = 0.01
    starts = torch.as_tensor(np.stack([state_obs([100, 100], GOAL_POSE), state_obs([100, 100], [150, 150, 0])]))
    envs = ModelVectorEnv(model, base, 2, horizon=6, start_states=starts, generator=torch.Generator().manual_seed(0))
    loop = ImaginedLoop(envs, "dense", seed=0, device="cpu")
    obs = loop.reset()  # seeds 1_000_000 and 1_000_001: start states 0 (block at the goal) and 1
    torch.testing.assert_close(obs["state"][:, -1], starts)
    decision = loop.step(np.full((2, 4, 2), 200.0))
    assert decision.terminated.tolist() == [True, False] and decision.n_steps.tolist() == [1, 4]
    assert decision.rewards[0].tolist() == [0.0, 0.0, 0.0, 0.0]  # success costs 0, no reward after the end
    assert (decision.rewards[1] < 0).all()
    assert loop.live.tolist() == [False, True]
    frozen = envs.window[0].clone()
    decision = loop.step(np.full((2, 4, 2), 200.0))
    assert decision.n_steps.tolist() == [0, 2] and decision.truncated.tolist() == [False, True]
    assert decision.live.tolist() == [False, True] and loop.round_over
    torch.testing.assert_close(envs.window[0], frozen, rtol=0, atol=0)  # the ended episode did not move
    assert loop.env_steps == 1 + 6
    assert [(e.success, e.length) for e in loop.episodes] == [(True, 1), (False, 6)]


# -- the Dyna cycle -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy_update", ["dppo", "dsrl"])
def test_iterate_keeps_the_base_frozen_and_bit_identical_and_counts_steps(build, policy_update):
    base = tiny_base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    method = build(policy_update, base=base)

    def learned() -> list[torch.Tensor]:  # the DSRL actor, or every weight of the DPPO copy
        adapter = method.adapter
        return [p.detach().clone() for p in (adapter.actor if policy_update == "dsrl" else adapter).parameters()]

    adapter_before = learned()
    logs = method.iterate()
    assert not any(p.requires_grad for p in base.parameters())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert logs["train/real_env_steps"] == method.loop.env_steps >= 16
    assert logs["train/imagined_steps"] == method.imagined.env_steps >= 24
    assert math.isfinite(logs["model/one_step_mse_heldout"])
    assert any(not torch.equal(a, b) for a, b in zip(learned(), adapter_before, strict=True))  # the policy learned


def test_real_collection_stops_at_the_cycle_count_and_the_run_budget(build):
    # 2 envs, chunks of 4 executed steps: whole chunks would collect 8 real steps per cycle, 16 after two.
    method = build(real_steps_per_cycle=6, budget=9)
    method.iterate()
    assert method.loop.env_steps == 6  # 3 steps of 2 live envs, the chunk cut there
    method.iterate()
    assert 9 <= method.loop.env_steps < 9 + method.loop.n_envs  # the budget's 3 steps left: 2 steps of 2 envs
    assert len(method.real["train"]["x"]) + len(method.real["heldout"]["x"]) == method.loop.env_steps


def test_state_round_trip(build):
    method = build("dppo")
    method.iterate()
    tensors, meta = method.state()
    json.dumps(meta)
    restored = build("dppo")
    restored.adapter.load_state_dict(method.adapter.state_dict())  # the runner restores the adapter weights
    restored.load_state(tensors, meta)
    x = method.transitions("heldout")[0][:7]
    torch.testing.assert_close(restored.model.predict(x), method.model.predict(x), rtol=0, atol=0)
    for split in ("train", "heldout"):
        assert torch.equal(restored.transitions(split)[1], method.transitions(split)[1])
    assert torch.equal(restored.envs.start_states, method.envs.start_states)
    assert (restored.imagined.env_steps, restored.cycles) == (method.imagined.env_steps, method.cycles)
    value_input = torch.randn(4, 40)
    assert torch.equal(restored.inner.value(value_input), method.inner.value(value_input))
    assert torch.equal(restored.generator.get_state(), method.generator.get_state())


def test_bad_configs_name_the_field(build):
    with pytest.raises(ValueError, match="policy_update must be one of"):
        WorldModelConfig(policy_update="ppo")
    with pytest.raises(ValueError, match="imagined_horizon must be >= 1, got 0"):
        WorldModelConfig(imagined_horizon=0)
    with pytest.raises(ValueError, match="ft_denoising_steps must be <= the base's num_inference_steps"):
        build(dppo=DPPOConfig(ft_denoising_steps=4))


# -- DPPO -----------------------------------------------------------------------------------------------------------
def test_dppo_chain_is_the_base_sampler_with_gaussian_last_steps(tmp_path):
    base = tiny_base()
    dppo = DPPOConfig(ft_denoising_steps=2).build(base, None, MethodContext())
    obs = {"state": torch.rand(3, 2, 20, generator=torch.Generator().manual_seed(1)) * 512}
    chunk, chain, log_prob = dppo.sample_chain(obs)
    assert chain.shape == (3, 3, 8, 2) and log_prob.shape == (3, 2)
    torch.testing.assert_close(chunk, base.normalizer.unnormalize("action", chain[:, -1].clamp(-1, 1)))
    # The stored log-probabilities are those the update recomputes (ratio 1 before any update): the Gaussian around
    # the DDIM mean with the floor std, averaged over the executed actions (rows To-1 .. To-1+Ta).
    cond = dppo.actor.encode_obs(obs)
    for k in range(2):
        mean = dppo.step_mean(cond, chain[:, k], torch.full((3,), k))
        expected = torch.distributions.Normal(mean, 0.1).log_prob(chain[:, k + 1])[:, 1:5].mean((1, 2))
        torch.testing.assert_close(log_prob[:, k], expected)
    # Without the exploration noise the chain is the base's own DDIM sampler from the same initial noise.
    quiet = DPPOConfig(ft_denoising_steps=2, min_std=1e-7).build(base, None, MethodContext(seed=3))
    noise = torch.randn(3, 8, 2, generator=torch.Generator().manual_seed(3))
    # (raw pixels: float32 rounding of the two code paths, and the 1e-7 noise, is ~1e-4)
    torch.testing.assert_close(
        quiet.sample_chain(obs)[0], base.predict_action_chunk(obs, noise=noise), atol=1e-3, rtol=0
    )
    # The adapter is a plain policy of the base's type; the base's parameters stay frozen.
    assert not any(p.requires_grad for p in base.parameters()) and all(
        p.requires_grad for p in dppo.adapter.parameters()
    )
    save_checkpoint(dppo.adapter, tmp_path / "adapted")
    loaded = load_policy(tmp_path / "adapted")
    assert loaded.config.type == "diffusion_unet"
    assert torch.equal(
        loaded.predict_action_chunk(obs, noise=noise), dppo.adapter.predict_action_chunk(obs, noise=noise)
    )


def test_dppo_gae_on_a_hand_computed_rollout():
    dppo = DPPOConfig(gae_lambda=0.5).build(tiny_base(), None, MethodContext())
    # One env, three decisions: r = 1, 2, 3; values 0.5, 1, 1.5; discounts 0.9 (gamma^n); the episode is truncated
    # at the third decision and bootstraps from next value 4; the last decision of a second env terminates.
    rollout = {
        "rewards": torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 5.0]]),
        "values": torch.tensor([[0.5, 0.0], [1.0, 0.0], [1.5, 2.0]]),
        "next_values": torch.tensor([[1.0, 0.0], [1.5, 0.0], [4.0, 7.0]]),
        "discounts": torch.full((3, 2), 0.9),
        "terminated": torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 1.0]]),
        "done": torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]),
    }
    advantages, returns = dppo.advantages(rollout)
    d3 = 3 + 0.9 * 4 - 1.5  # 5.1
    d2 = 2 + 0.9 * 1.5 - 1.0  # 2.35
    d1 = 1 + 0.9 * 1.0 - 0.5  # 1.4
    a2 = d2 + 0.45 * d3
    a1 = d1 + 0.45 * a2
    torch.testing.assert_close(advantages[:, 0], torch.tensor([a1, a2, d3]))
    assert advantages[2, 1].item() == pytest.approx(5 - 2.0)  # terminated: no bootstrap
    torch.testing.assert_close(returns, advantages + rollout["values"])


# -- CLI ------------------------------------------------------------------------------------------------------------
def test_cli_adapt_world_model_smoke(tmp_path, pusht_path):
    save_checkpoint(tiny_base(), tmp_path / "base")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "adapt",
            "method=world_model",
            f"base={tmp_path / 'base'}",
            f"run_dir={run_dir}",
            "logger=none",
            "task.max_steps=12",
            "task.n_envs=1",
            "loop.total_env_steps=16",
            "loop.n_envs=2",
            "loop.eval_episodes=1",
            "loop.log_every=1",
            "rl.ensemble_size=2",
            "rl.hidden_dims=[16]",
            "rl.model_steps_per_cycle=5",
            "rl.real_steps_per_cycle=16",
            "rl.imagined_steps_per_cycle=16",
            "rl.imagined_envs=2",
            "rl.imagined_horizon=8",
            "rl.dppo.minibatch_size=16",
            "rl.dppo.update_epochs=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/real_env_steps" in r]
    assert train and train[-1]["train/real_env_steps"] >= 16 and "model/one_step_mse_heldout" in train[-1]
    assert train[-1]["train/imagined_steps"] >= 16
    assert [r["policy"] for r in records if "eval/score" in r] == ["base", "world_model"]
    adapted = load_policy(run_dir / "checkpoints" / "latest")
    assert adapted.config.type == "diffusion_unet"  # the DPPO copy: a plain policy
