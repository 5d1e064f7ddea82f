"""RL adaptation core: adapters on a frozen base, the environment loop, the replay buffer, DSRL and DSRL-NA, and the
`robodiff adapt` run (checkpoint, resume, clear errors)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from envs.executor import make_executor
from envs.tasks import TaskConfig
from policies.checkpoint import load_policy, save_checkpoint
from policies.diffusion_unet import DiffusionUnetConfig
from policies.registry import make_policy
from rl.adapters import NoiseConfig, ResidualConfig
from rl.dsrl import DSRLConfig, DSRLNAConfig
from rl.env_loop import EnvLoop
from rl.methods import MethodContext
from rl.replay import ReplayBuffer

SHAPE_META = {"obs": {"state": [20]}, "action": [2]}


def tiny_base(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = DiffusionUnetConfig(
        horizon=8,
        n_obs_steps=2,
        n_action_steps=4,
        down_dims=[8, 16],
        diffusion_step_embed_dim=8,
        num_inference_steps=3,
        **overrides,
    )
    policy = make_policy(config, SHAPE_META)
    g = torch.Generator().manual_seed(seed)
    data = {"state": torch.rand(64, 20, generator=g) * 512, "action": torch.rand(64, 2, generator=g) * 512}
    policy.fit_normalizer(data)
    return policy.eval()


def obs_batch(b: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"state": torch.rand(b, 2, 20, generator=torch.Generator().manual_seed(seed)) * 512}


def with_base_weights(adapter, base):
    adapter.base.load_state_dict(base.state_dict())
    return adapter


# -- adapters -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_cls", [ResidualConfig, NoiseConfig])
def test_adapter_base_is_frozen_and_inherits_the_data_fields(config_cls):
    base = tiny_base()
    adapter = with_base_weights(config_cls.for_base(base).build(base.shape_meta), base)
    assert not any(p.requires_grad for p in adapter.base.parameters())
    base_ids = {id(p) for p in adapter.base.parameters()}
    assert adapter.trainable_parameters() and not any(id(p) in base_ids for p in adapter.trainable_parameters())
    assert (adapter.config.horizon, adapter.config.n_obs_steps) == (8, 2)
    adapter.train()
    assert not adapter.base.training  # the base stays in inference mode
    with pytest.raises(ValueError, match="horizon is the base policy's"):
        config_cls(base_type="diffusion_unet", base_config=dataclasses.asdict(base.config), horizon=16)


def test_dsrl_adapter_runs_the_base_on_the_given_noise_exactly():
    base = tiny_base()
    adapter = with_base_weights(NoiseConfig.for_base(base).build(base.shape_meta), base)
    obs = obs_batch()
    w = torch.randn(3, 8, 2)
    assert torch.equal(adapter.chunk_from_noise(obs, w), base.predict_action_chunk(obs, noise=w))
    # predict_action_chunk: the actor's mean latent, or the latent its Gaussian maps `noise` (xi) to.
    mean_w = adapter.mean_noise(obs)
    assert mean_w.abs().max() <= adapter.config.noise_bound
    assert torch.equal(adapter.predict_action_chunk(obs), base.predict_action_chunk(obs, noise=mean_w))
    xi = torch.randn(3, 8, 2)
    w_xi, _ = adapter.sample_noise(obs, xi)
    assert torch.equal(adapter.predict_action_chunk(obs, noise=xi), base.predict_action_chunk(obs, noise=w_xi))


def test_dsrl_sample_latent_draws_a_fresh_latent_per_call():
    base = tiny_base()
    config = dataclasses.replace(NoiseConfig.for_base(base), sample_latent=True)
    adapter = with_base_weights(config.build(base.shape_meta), base)
    obs = obs_batch()
    torch.manual_seed(5)
    first = adapter.predict_action_chunk(obs)
    torch.manual_seed(5)
    xi = torch.randn(3, 8, 2)  # the draw predict_action_chunk made
    assert torch.equal(first, adapter.predict_action_chunk(obs, noise=xi))
    assert not torch.equal(first, adapter.predict_action_chunk(obs))  # a new draw
    assert not torch.equal(first, base.predict_action_chunk(obs, noise=adapter.mean_noise(obs)))


@pytest.mark.parametrize("config_cls", [DSRLConfig, DSRLNAConfig])
def test_dsrl_method_sample_latent_reaches_the_adapter(config_cls):
    """rl.sample_latent decides what the adapted policy evaluates (in-run and from its checkpoint): the mean latent
    by default, a fresh latent per chunk when set."""
    obs = obs_batch()
    for sample, repeats in ((False, True), (True, False)):
        algo, _, loop = make_dsrl(config_cls, sample_latent=sample)
        loop.close()
        assert algo.adapter.config.sample_latent is sample
        same = torch.equal(algo.adapter.predict_action_chunk(obs), algo.adapter.predict_action_chunk(obs))
        assert same is repeats


def test_dsrl_sphere_noise_space_gives_the_base_typical_norm_noise():
    """noise_space=sphere: the base samples from w rescaled to the norm sqrt(H * Da), whatever w's scale, so the
    actor chooses a direction only; the scale-free mapping keeps chunks from the mean latent on that shell too."""
    base = tiny_base()
    config = dataclasses.replace(NoiseConfig.for_base(base), noise_space="sphere")
    adapter = with_base_weights(config.build(base.shape_meta), base)
    obs = obs_batch()
    w = torch.randn(3, 8, 2) * torch.tensor([0.1, 1.0, 3.0])[:, None, None]
    shell = w * (4.0 / w.flatten(1).norm(dim=1))[:, None, None]  # sqrt(8 * 2) = 4
    torch.testing.assert_close(adapter.base_noise(w).flatten(1).norm(dim=1), torch.full((3,), 4.0))
    torch.testing.assert_close(adapter.chunk_from_noise(obs, w), base.predict_action_chunk(obs, noise=shell))
    torch.testing.assert_close(adapter.chunk_from_noise(obs, 0.5 * w), adapter.chunk_from_noise(obs, w))
    box = with_base_weights(NoiseConfig.for_base(base).build(base.shape_meta), base)
    assert not torch.allclose(box.chunk_from_noise(obs, w), adapter.chunk_from_noise(obs, w))
    with pytest.raises(ValueError, match="noise_space must be one of"):
        dataclasses.replace(NoiseConfig.for_base(base), noise_space="ball")


def test_dsrl_refuses_a_stochastic_sampler():
    base = tiny_base(sampler="ddpm")
    with pytest.raises(ValueError, match="deterministically"):
        NoiseConfig.for_base(base)


def test_residual_adapter_at_init_equals_the_base_through_the_executor():
    base = tiny_base()
    adapter = with_base_weights(ResidualConfig.for_base(base).build(base.shape_meta), base)
    obs = obs_batch(2)
    noise = torch.randn(2, 8, 2)
    assert torch.equal(adapter.predict_action_chunk(obs, noise=noise), base.predict_action_chunk(obs, noise=noise))
    runs = []
    for policy in (base, adapter):
        torch.manual_seed(5)  # the executor draws the same noise for both
        runner = make_executor("chunk", policy, 2, 4)
        runner.reset(2)
        rng = np.random.default_rng(0)
        runs.append(np.stack([runner.act({"state": rng.random((2, 20), dtype=np.float32) * 512}) for _ in range(6)]))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_residual_correction_uses_the_observation_of_each_step():
    base = tiny_base()
    adapter = with_base_weights(ResidualConfig.for_base(base).build(base.shape_meta), base)
    torch.nn.init.normal_(adapter.actor[-1].weight)  # a non-zero residual
    runner = make_executor("chunk", adapter, 2, 4)
    runner.reset(1)
    obs_a = {"state": np.full((1, 20), 100.0, dtype=np.float32)}
    obs_b = {"state": np.full((1, 20), 400.0, dtype=np.float32)}
    torch.manual_seed(0)
    runner.act(obs_a)
    queued = runner._queue[0].copy()  # the next base action, corrected only when executed
    second = runner.act(obs_b)
    window = {"state": torch.as_tensor(np.stack([obs_a["state"], obs_b["state"]], axis=1))}
    expected = adapter.correct_action(window, torch.as_tensor(queued))
    np.testing.assert_allclose(second, expected.numpy(), rtol=1e-6)
    assert not np.allclose(second, queued)


@pytest.mark.parametrize("config_cls", [ResidualConfig, NoiseConfig])
def test_adapted_checkpoint_loads_through_the_registry(tmp_path, config_cls):
    base = tiny_base()
    adapter = with_base_weights(config_cls.for_base(base).build(base.shape_meta), base)
    torch.nn.init.normal_(adapter.actor.mu.weight if config_cls is NoiseConfig else adapter.actor[-1].weight)
    save_checkpoint(adapter, tmp_path / "ckpt")
    loaded = load_policy(tmp_path / "ckpt")
    assert type(loaded) is type(adapter)
    obs, noise = obs_batch(), torch.randn(3, 8, 2)
    assert torch.equal(loaded.predict_action_chunk(obs, noise=noise), adapter.predict_action_chunk(obs, noise=noise))


# -- environment loop and replay --------------------------------------------------------------------------------
def test_env_loop_masks_ended_episodes_and_keeps_their_last_window():
    loop = EnvLoop("state", 2, 2, max_steps=6, reward="dense", seed=3)
    obs = loop.reset()
    assert obs["state"].shape == (2, 2, 20) and torch.equal(obs["state"][:, 0], obs["state"][:, 1])
    assert loop.seeds == [4_000_000, 4_000_001]  # 1_000_000 * (seed + 1) + episode: never the test seeds
    hold = obs["state"][:, -1, -2:].numpy()  # stay where the agent is: no success in 6 steps
    first = loop.step(np.repeat(hold[:, None], 4, axis=1))
    assert first.n_steps.tolist() == [4, 4] and not first.done.any() and first.live.all()
    assert np.all(first.rewards <= 0) and np.all(first.rewards >= -1)
    second = loop.step(np.repeat(hold[:, None], 4, axis=1))  # the 6-step limit falls inside this decision
    assert second.n_steps.tolist() == [2, 2] and second.truncated.all() and not second.terminated.any()
    assert np.all(second.rewards[:, 2:] == 0) and loop.round_over and loop.env_steps == 12
    assert [e.length for e in loop.episodes] == [6, 6]
    with pytest.raises(RuntimeError, match="reset"):
        loop.step(np.zeros((2, 1, 2)))
    loop.close()


def test_env_loop_sparse_reward_and_seeds():
    loop = EnvLoop("state", 1, 1, max_steps=3, reward="sparse", seed=0)
    loop.reset()
    assert loop.seeds == [1_000_000]
    d = loop.step(np.full((1, 3, 2), 256.0))
    assert d.rewards.tolist() == [[0.0, 0.0, 0.0]] and d.truncated.all()
    assert d.discounted_reward(0.5).tolist() == [0.0]
    loop.reset()
    assert loop.seeds == [1_000_001]
    loop.close()
    with pytest.raises(ValueError, match="reward must be one of"):
        EnvLoop("state", 1, 1, reward="shaped")


def test_replay_buffer_is_a_ring_and_round_trips():
    buf = ReplayBuffer(3, {"x": (2,), "r": ()})
    for i in range(4):
        buf.add(x=torch.full((1, 2), float(i)), r=torch.tensor([float(i)]))
    assert len(buf) == 3 and sorted(buf.storage["r"].tolist()) == [1.0, 2.0, 3.0]
    tensors, meta = buf.state("b")
    other = ReplayBuffer(3, {"x": (2,), "r": ()})
    other.load_state("b", tensors, meta)
    assert torch.equal(other.storage["x"], buf.storage["x"]) and other.ptr == buf.ptr == 1
    with pytest.raises(ValueError, match="exactly the fields"):
        buf.add(x=torch.zeros(1, 2))


# -- DSRL ----------------------------------------------------------------------------------------------------------
def make_dsrl(config_cls=DSRLConfig, n_envs=2, **fields):
    base = tiny_base()
    loop = EnvLoop("state", n_envs, 2, max_steps=8, seed=0)
    config = config_cls(hidden_dims=[16], actor_hidden_dims=[16], batch_size=4, warmup_steps=0, **fields)
    return config.build(base, loop, MethodContext(seed=0)), base, loop


def test_dsrl_td_target_and_temperature_update_by_hand():
    algo, _, loop = make_dsrl(init_alpha=1e-12)
    x, x_next = torch.randn(4, algo.adapter.input_dim), torch.randn(4, algo.adapter.input_dim)
    batch = {
        "x": x,
        "u": torch.rand(4, 16) * 2 - 1,
        "r": torch.tensor([-1.0, -0.5, 0.0, -2.0]),
        "discount": torch.tensor([0.9, 0.9, 0.0, 0.5]),
        "x_next": x_next,
    }

    with torch.no_grad():  # target critics that output 2 and 3 everywhere
        for head, value in ((algo.qf_target.qf1[-1], 2.0), (algo.qf_target.qf2[-1], 3.0)):
            head.weight.zero_()
            head.bias.fill_(value)
    with torch.no_grad():
        qf1, qf2 = algo.qf(batch["x"], batch["u"])
    target = batch["r"] + batch["discount"] * 2.0  # min of the twin targets; alpha ~ 0 removes the entropy term
    expected = torch.nn.functional.mse_loss(qf1, target) + torch.nn.functional.mse_loss(qf2, target)
    logs = algo.update(batch)
    assert logs["train/qf_loss"] == pytest.approx(expected.item(), rel=1e-5)
    loop.close()

    # Temperature: Adam's first step moves log_alpha by lr against the sign of the gradient of
    # -alpha * (log_pi + target_entropy), which is negative when the entropy (-log_pi) is below the target.
    algo, _, loop = make_dsrl(init_alpha=0.5)
    log_alpha = algo.log_alpha.item()
    logs = algo.update(batch)
    entropy_below_target = logs["train/entropy"] < algo.target_entropy
    step = algo.log_alpha.item() - log_alpha
    assert step == pytest.approx(algo.config.lr if entropy_below_target else -algo.config.lr, rel=1e-3)
    loop.close()


def test_dsrl_bootstrap_base_values_the_base_noise_without_the_entropy_bonus():
    """bootstrap=base: the TD target is r + discount * min Q'(s', w' / b) with w' ~ N(0, I): no entropy bonus
    however large alpha is, and the next noise is drawn from the run's generator, not from the actor."""
    batch = {
        "x": torch.randn(4, 40),
        "u": torch.rand(4, 16) * 2 - 1,
        "r": torch.tensor([-1.0, -0.5, 0.0, -2.0]),
        "discount": torch.tensor([0.9, 0.9, 0.0, 0.5]),
        "x_next": torch.randn(4, 40),
    }
    losses = {}
    for bootstrap in ("base", "actor"):
        algo, _, loop = make_dsrl(init_alpha=5.0, bootstrap=bootstrap)
        assert algo.adapter.input_dim == 40
        with torch.no_grad():  # target critics: 2 and 3 everywhere
            for head, value in ((algo.qf_target.qf1[-1], 2.0), (algo.qf_target.qf2[-1], 3.0)):
                head.weight.zero_()
                head.bias.fill_(value)
            qf1, qf2 = algo.qf(batch["x"], batch["u"])
        target = batch["r"] + batch["discount"] * 2.0
        expected = torch.nn.functional.mse_loss(qf1, target) + torch.nn.functional.mse_loss(qf2, target)
        losses[bootstrap] = (algo.update(batch)["train/qf_loss"], expected.item())
        loop.close()
    assert losses["base"][0] == pytest.approx(losses["base"][1], rel=1e-5)
    assert losses["actor"][0] != pytest.approx(losses["actor"][1], rel=1e-3)  # alpha 5: the bonus counts there
    with pytest.raises(ValueError, match="bootstrap must be"):
        DSRLConfig(bootstrap="target")


def test_dsrl_iterate_keeps_the_base_bit_identical_and_learns_the_actor():
    algo, base, loop = make_dsrl()
    before = {k: v.clone() for k, v in algo.adapter.base.state_dict().items()}
    actor_before = [p.clone() for p in algo.adapter.actor.parameters()]
    for _ in range(3):
        logs = algo.iterate()
    assert math.isfinite(logs["train/qf_loss"]) and loop.env_steps == 24
    after = algo.adapter.base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in algo.adapter.base.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(actor_before, algo.adapter.actor.parameters(), strict=True))
    loop.close()


def test_dsrl_na_aliases_noise_to_the_base_chunk():
    algo, base, loop = make_dsrl(DSRLNAConfig, n_alias=2)
    algo.iterate()
    assert len(algo.alias) == 2 * 2 and len(algo.buffer) == 2
    rows = algo.alias.storage
    w = (rows["u"][:4] * algo.config.noise_bound).unflatten(1, (8, 2))
    # The collected states are the first windows of the round's seeds: replay them in a second loop, then the
    # stored action of each alias row must be the executed part of base(s, w) at its state.
    loop2 = EnvLoop("state", 2, 2, max_steps=8, seed=0)
    start = loop2.reset()
    loop2.close()
    repeated = {k: v.repeat_interleave(2, 0) for k, v in start.items()}
    expected = algo.executed(base.predict_action_chunk(repeated, noise=w))
    torch.testing.assert_close(rows["a"][:4], expected, rtol=1e-5, atol=1e-6)
    logs = algo.iterate()
    assert math.isfinite(logs["train/qa_loss"]) and algo.target_entropy == 0.0
    loop.close()


def test_dsrl_state_round_trip():
    algo, _, loop = make_dsrl(DSRLNAConfig)
    algo.iterate()
    tensors, meta = algo.state()
    json.dumps(meta)  # the meta must be JSON
    other, _, loop2 = make_dsrl(DSRLNAConfig)
    other.load_state(tensors, meta)
    assert len(other.buffer) == len(algo.buffer) and other.updates == algo.updates
    for a, b in zip(algo.qa.parameters(), other.qa.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(other.log_alpha, algo.log_alpha)
    loop.close()
    loop2.close()


# -- the adapt command ----------------------------------------------------------------------------------------------
def robodiff(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"robodiff {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def base_checkpoint(tmp_path):
    return save_checkpoint(tiny_base(), tmp_path / "base", extra_config={"task": dataclasses.asdict(TaskConfig())})


ADAPT_TINY = [
    "loop.eval_episodes=1",
    "loop.n_envs=2",
    "task.max_steps=8",
    "logger=none",
    "rl.hidden_dims=[16]",
    "rl.actor_hidden_dims=[16]",
    "rl.batch_size=4",
    "rl.warmup_steps=8",
]


@pytest.mark.slow
def test_adapt_cli_saves_a_loadable_checkpoint_and_resumes(tmp_path, base_checkpoint):
    run_dir = tmp_path / "run"
    args = ["adapt", "method=dsrl", f"base={base_checkpoint}", *ADAPT_TINY, f"run_dir={run_dir}"]
    out = json.loads(robodiff(*args, "loop.total_env_steps=16", "loop.eval_at=[8]").stdout.splitlines()[-1])
    assert out["env_steps"] == 16 and out["method"] == "dsrl"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("policy") == "dsrl"] == [8, 16]
    assert [r["policy"] for r in records if "eval/score" in r][0] == "base"
    assert (run_dir / "learning_curve.png").stat().st_size > 1000
    adapted = load_policy(run_dir / "checkpoints" / "latest")
    assert adapted.config.type == "dsrl"
    proc = robodiff(
        "eval", f"checkpoint={run_dir / 'checkpoints' / 'latest'}", "n_episodes=1", "max_steps=8", "video=false"
    )
    assert json.loads(proc.stdout.splitlines()[-1])["n_episodes"] == 1
    # Resume with a larger budget: continues from 16 steps, keeps the earlier records.
    out = json.loads(robodiff("adapt", f"resume={run_dir}", "loop.total_env_steps=32").stdout.splitlines()[-1])
    assert out["env_steps"] == 32
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("policy") == "dsrl"] == [8, 16, 32]


def test_adapt_refuses_a_base_from_another_observation_space(tmp_path, base_checkpoint):
    proc = robodiff(
        "adapt",
        "method=dsrl",
        f"base={base_checkpoint}",
        "task=pusht_image",
        *ADAPT_TINY,
        f"run_dir={tmp_path / 'r'}",
        check=False,
    )
    assert proc.returncode == 2
    assert "observes {'state': [20]}" in proc.stderr and "pusht_image" in proc.stderr
    proc = robodiff("adapt", "method=nope", f"base={base_checkpoint}", check=False)
    assert proc.returncode == 2 and "nope" in proc.stderr
