"""Contract tests run for every registered policy (see ../shared/ARCHITECTURE.md, Contracts)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import policies  # noqa: F401  (registers every policy)
from data.pusht import shape_meta
from policies.checkpoint import MODEL_FILE, load_policy, save_checkpoint
from policies.registry import config_class, config_from_dict, make_policy, plugin_names, policy_names

# The policy family trained from demonstrations; RL adapters (entry-point plugins, registered once `rl` is
# imported by another test module) wrap a trained base and have their own tests.
FAMILY = sorted(set(policy_names()) - set(plugin_names()))

SHAPE_META = shape_meta("state")
B = 3


def make(name: str):
    torch.manual_seed(0)
    policy = make_policy(config_class(name)(), SHAPE_META)
    # Normalizer statistics that are not the identity, so raw vs normalized units are told apart.
    policy.fit_normalizer({"state": torch.rand(64, 20) * 400 + 50, "action": torch.rand(64, 2) * 300 + 100})
    return policy.eval()


def batch_for(policy, b: int = B) -> dict:
    g = torch.Generator().manual_seed(1)
    c = policy.config
    batch = {
        "obs": {"state": torch.rand(b, c.n_obs_steps, 20, generator=g) * 400 + 50},
        "action": torch.rand(b, c.horizon, 2, generator=g) * 300 + 100,
    }
    if c.needs_transitions:  # offline RL (OFQL): next observation window, per-step rewards and terminals
        batch["next_obs"] = {"state": torch.rand(b, c.n_obs_steps, 20, generator=g) * 400 + 50}
        batch["reward"] = torch.rand(b, c.n_action_steps, generator=g)
        batch["terminal"] = torch.zeros(b, c.n_action_steps)
    return batch


def noise_for(policy, b: int = B, seed: int = 2) -> torch.Tensor:
    return torch.randn(b, policy.config.horizon, 2, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=FAMILY)
def policy(request):
    return make(request.param)


def test_registry_lists_diffusion_unet():
    assert "diffusion_unet" in policy_names()
    with pytest.raises(ValueError, match="unknown policy 'nope'; registered policies"):
        config_class("nope")
    with pytest.raises(ValueError, match=r"unknown fields \['foo'\]"):
        config_from_dict("diffusion_unet", {"foo": 1})


def test_loss_backward_finite_nonzero_grads(policy):
    policy.train()
    loss, logs = policy.compute_loss(batch_for(policy))
    assert loss.ndim == 0 and torch.isfinite(loss) and "loss" in logs
    loss.backward()
    grads = [p.grad for p in policy.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert sum(1 for g in grads if g.abs().sum() > 0) / len(grads) > 0.95


def test_batch_not_mutated(policy):
    batch = batch_for(policy)
    before = copy.deepcopy(batch)
    policy.compute_loss(batch)
    policy.predict_action_chunk(batch["obs"])
    assert torch.equal(batch["action"], before["action"])
    assert torch.equal(batch["obs"]["state"], before["obs"]["state"])


def test_output_shape_raw_units_and_determinism(policy):
    obs = batch_for(policy)["obs"]
    noise = noise_for(policy)
    a1 = policy.predict_action_chunk(obs, noise=noise)
    a2 = policy.predict_action_chunk(obs, noise=noise.clone())
    assert a1.shape == (B, policy.config.horizon, 2)
    assert torch.equal(a1, a2)  # the same injected noise gives the same chunk
    a3 = policy.predict_action_chunk(obs, noise=noise_for(policy, seed=3))
    assert not torch.equal(a1, a3)
    # Raw units: outputs live in the action range the normalizer was fitted on (about 100..400 px).
    lo, hi = policy.normalizer.action_min, policy.normalizer.action_max
    span = hi - lo
    assert (a1 > lo - span).all() and (a1 < hi + span).all() and a1.abs().mean() > 50


def test_save_load_reproduces_outputs(policy, tmp_path):
    obs, noise = batch_for(policy)["obs"], noise_for(policy)
    expected = policy.predict_action_chunk(obs, noise=noise)
    ckpt = save_checkpoint(policy, tmp_path / "ckpt", {"task": {"name": "pusht_state"}})
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", MODEL_FILE]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["policy_type"] == policy.config.type and config["task"]["name"] == "pusht_state"
    loaded = load_policy(ckpt)
    assert torch.equal(loaded.predict_action_chunk(obs, noise=noise), expected)


def test_wrong_observation_shape_names_expected_and_received(policy):
    obs = {"state": torch.zeros(B, policy.config.n_obs_steps, 19)}
    with pytest.raises(ValueError, match=r"observation 'state' has shape \[3, 2, 19\], expected \[B, 2, 20\]"):
        policy.predict_action_chunk(obs)
    with pytest.raises(ValueError, match="missing keys"):
        policy.predict_action_chunk({"agent_pos": torch.zeros(B, 2, 2)})
    with pytest.raises(ValueError, match=r"noise has shape \[3, 4, 2\], expected \[3, 16, 2\]"):
        policy.predict_action_chunk(batch_for(policy)["obs"], noise=torch.zeros(B, 4, 2))


def test_nan_in_batch_is_rejected(policy):
    batch = batch_for(policy)
    batch["obs"]["state"][0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="observation 'state' contains NaN"):
        policy.compute_loss(batch)
    batch = batch_for(policy)
    batch["action"][1, 2, 0] = float("inf")
    with pytest.raises(ValueError, match="batch 'action' contains NaN or inf"):
        policy.compute_loss(batch)


def test_truncated_checkpoint_gives_clear_error(policy, tmp_path):
    ckpt = save_checkpoint(policy, tmp_path / "ckpt")
    model = ckpt / MODEL_FILE
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or damaged"):
        load_policy(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_policy(ckpt)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy(tmp_path / "missing")


def test_bad_config_values_name_the_field():
    cls = config_class("diffusion_unet")
    with pytest.raises(ValueError, match="horizon must be divisible by 4 for down_dims \\[64, 128, 256\\], got 18"):
        cls(horizon=18)
    with pytest.raises(ValueError, match="sampler must be one of"):
        cls(sampler="euler")
    with pytest.raises(ValueError, match="num_inference_steps must be in"):
        cls(num_inference_steps=0)
    with pytest.raises(ValueError, match="n_obs_steps - 1 \\+ n_action_steps must be <= horizon"):
        cls(n_obs_steps=2, n_action_steps=16, horizon=16)


def test_inference_overrides_on_load(tmp_path):
    policy = make("diffusion_unet")
    ckpt = save_checkpoint(policy, tmp_path / "ckpt")
    ddpm = load_policy(ckpt, sampler="ddpm", num_inference_steps=100)
    assert ddpm.config.sampler == "ddpm" and ddpm.config.num_inference_steps == 100
    with pytest.raises(ValueError, match="num_inference_steps must be in"):
        load_policy(ckpt, num_inference_steps=1000)
