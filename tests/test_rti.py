"""RTI executor (RTI-DP, Duan et al. 2025) and the policies' warm-started sampling (refine_action_chunk)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import policies  # noqa: F401  (registers every policy)
from data.pusht import shape_meta
from envs.executor import DEFAULT_ENSEMBLE_K, ChunkExecutor, RTIExecutor, make_executor, shift_chunk
from policies.registry import config_class, make_policy

SHAPE_META = shape_meta("state")
TINY_UNET = {"down_dims": [16, 32], "diffusion_step_embed_dim": 16}


def tiny(name: str, **overrides):
    torch.manual_seed(0)
    policy = make_policy(config_class(name)(**TINY_UNET, **overrides), SHAPE_META)
    policy.fit_normalizer({"state": torch.rand(64, 20) * 400 + 50, "action": torch.rand(64, 2) * 300 + 100})
    return policy.eval()


def obs_window(b: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"state": torch.rand(b, 2, 20, generator=g) * 400 + 50}


def count_denoise(policy) -> list[torch.Tensor]:
    """Wrap the policy's denoiser; returns the list that records the time/level of every call."""
    calls: list[torch.Tensor] = []
    denoise = policy.denoise

    def recording(x_t, t, cond):
        calls.append(t.clone())
        return denoise(x_t, t, cond)

    policy.denoise = recording
    return calls


class RecordingRefiner:
    """predict: chunk[b, h] = (1000 * call + h, 0.3 + 0.4 * (h odd)); the n-th refine (n from 1) returns the warm
    start + 10 n and records its arguments."""

    def __init__(self, horizon: int = 8) -> None:
        self.horizon = horizon
        self.predicts = 0
        self.refines: list[dict] = []

    def _calls(self) -> int:
        return self.predicts + len(self.refines)

    def predict_action_chunk(self, obs, noise=None):
        batch = obs["x"].shape[0]
        self.predicts += 1
        h = torch.arange(self.horizon, dtype=torch.float32)
        first = (1000.0 * (self._calls() - 1) + h).expand(batch, -1)
        second = (0.3 + 0.4 * (h % 2)).expand(batch, -1)
        return torch.stack([first, second], dim=-1)  # [B, H, 2]

    def refine_action_chunk(self, obs, actions, num_steps, start, noise=None):
        self.refines.append({"actions": actions.clone(), "num_steps": num_steps, "start": start, "obs": obs["x"]})
        return actions + 10.0 * len(self.refines)


def obs_at(t: int, batch: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.full((batch, 3), float(t))}


# -- executor ---------------------------------------------------------------------------------------------------
def test_shift_chunk_shifts_left_and_repeats_last_action() -> None:
    chunk = np.arange(2 * 5 * 2, dtype=np.float32).reshape(2, 5, 2)
    for k in range(5):
        shifted = shift_chunk(chunk, k)
        np.testing.assert_array_equal(shifted[:, : 5 - k], chunk[:, k:])
        np.testing.assert_array_equal(shifted[:, 5 - k :], np.repeat(chunk[:, -1:], k, axis=1))
    with pytest.raises(ValueError, match=r"shift must be in \[0, H=5\), got 5"):
        shift_chunk(chunk, 5)


def test_rti_refines_the_shifted_previous_chunk_every_step() -> None:
    policy = RecordingRefiner()
    ex = make_executor("rti", policy, n_obs_steps=2, n_action_steps=4, rti_steps=2, rti_start=0.4, rti_every=1)
    assert isinstance(ex, RTIExecutor)
    ex.reset(batch_size=2)
    actions = [ex.act(obs_at(t)) for t in range(4)]
    assert policy.predicts == 1 and len(policy.refines) == 3  # full sampling once, then one refinement per step
    assert all(r["num_steps"] == 2 and r["start"] == 0.4 for r in policy.refines)
    h = np.arange(8, dtype=np.float32)
    first = np.broadcast_to(np.stack([h, 0.3 + 0.4 * (h % 2)], -1), (2, 8, 2))  # what predict returned
    np.testing.assert_array_equal(policy.refines[0]["actions"].numpy(), shift_chunk(first, 1))
    np.testing.assert_array_equal(  # each warm start = the previous refined chunk shifted by one step
        policy.refines[1]["actions"].numpy(), shift_chunk(policy.refines[0]["actions"].numpy() + 10.0, 1)
    )
    # Executed: chunk[:, To-1] of each new chunk; the observation window slides (oldest first).
    assert [a[0, 0] for a in actions] == [1.0, 2.0 + 10.0, 3.0 + 10.0 + 20.0, 4.0 + 10.0 + 20.0 + 30.0]
    np.testing.assert_array_equal(policy.refines[2]["obs"][:, :, 0].numpy(), [[2, 3], [2, 3]])


def test_rti_every_k_steps_executes_in_between_and_shifts_by_k() -> None:
    policy = RecordingRefiner()
    ex = make_executor("rti", policy, 2, 8, rti_every=3)
    ex.reset(batch_size=1)
    actions = [ex.act(obs_at(t, batch=1))[0, 0] for t in range(7)]
    assert policy.predicts == 1 and len(policy.refines) == 2  # steps 3 and 6
    assert policy.refines[0]["num_steps"] == 3 and policy.refines[0]["start"] == 0.2  # defaults
    assert actions[:3] == [1.0, 2.0, 3.0]
    np.testing.assert_array_equal(policy.refines[0]["actions"][0, :, 0].numpy(), [3, 4, 5, 6, 7, 7, 7, 7])
    assert actions[3:6] == [14.0, 15.0, 16.0]  # shifted chunk + 10, from offset 1
    ex.reset(batch_size=1)
    ex.act(obs_at(0, batch=1))
    assert policy.predicts == 2  # a new episode samples from noise again


def test_snapping_discrete_dims() -> None:
    ex = make_executor("rti", RecordingRefiner(), 2, 4, rti_every=1, discrete_dims=[1], snap_values=[0.0, 1.0])
    ex.reset(batch_size=2)
    snapped = [ex.act(obs_at(t))[:, 1] for t in range(3)]
    # dim 1 of chunk[:, 1] is 0.7 -> 1; refined ones add 10, 30 -> the nearest is 1
    for values in snapped:
        np.testing.assert_array_equal(values, [1.0, 1.0])
    chunk = ChunkExecutor(RecordingRefiner(), 1, 2, discrete_dims=[1], snap_values=[1.0, 0.0])
    chunk.reset(batch_size=1)
    assert [chunk.act(obs_at(t, batch=1))[0, 1] for t in range(2)] == [0.0, 1.0]  # 0.3 -> 0, 0.7 -> 1
    assert chunk.act(obs_at(2, batch=1))[0, 0] == 1000.0  # other dims untouched


def test_ensemble_executor_uses_act_default_weight() -> None:
    policy = RecordingRefiner()
    ex = make_executor("ensemble", policy, n_obs_steps=1, n_action_steps=3)
    assert type(ex) is ChunkExecutor and ex.temporal_ensemble == DEFAULT_ENSEMBLE_K
    ex.reset(batch_size=1)
    a0, a1 = (ex.act(obs_at(t, batch=1))[0, 0] for t in range(2))
    w = np.exp(-DEFAULT_ENSEMBLE_K * np.arange(2))
    assert a0 == 0.0
    np.testing.assert_allclose(a1, (w[0] * 1.0 + w[1] * 1000.0) / w.sum(), rtol=1e-6)
    assert make_executor("ensemble", policy, 1, 3, temporal_ensemble=0.5).temporal_ensemble == 0.5
    assert make_executor("chunk", policy, 1, 3, temporal_ensemble=0.5).temporal_ensemble == 0.5


class NoRefine:
    def predict_action_chunk(self, obs, noise=None):
        raise AssertionError("not called")


@pytest.mark.parametrize(
    ("kind", "kwargs", "message"),
    [
        ("rti", {"policy": NoRefine()}, r"NoRefine has no refine_action_chunk.*\('chunk', 'ensemble', 'streaming'\)"),
        ("rti", {"rti_stepz": 2}, r"unknown options \['rti_stepz'\] for executor 'rti'; allowed: \['rti_steps'"),
        ("chunk", {"rti_steps": 2}, r"unknown options \['rti_steps'\] for executor 'chunk'; allowed: \['discrete"),
        ("rti", {"rti_start": 0.0}, r"rti_start must be a float in \(0, 1\], got 0.0"),
        ("rti", {"rti_steps": 0}, "rti_steps must be an int >= 1, got 0"),
        ("rti", {"rti_every": 8}, None),  # accepted; fails at the first chunk (offset 1 + 8 > H = 8)
        ("rti", {"temporal_ensemble": 0.1}, "temporal_ensemble applies to the chunk and ensemble executors"),
        ("chunk", {"discrete_dims": [1]}, r"discrete_dims \[1\] need snap_values"),
        ("chunk", {"discrete_dims": [1, 1], "snap_values": [0]}, "discrete_dims must not repeat"),
        ("chunk", {"discrete_dims": [0], "snap_values": []}, "snap_values must be a non-empty list"),
        ("async", {}, r"executor must be one of \('chunk', 'ensemble', 'rti', 'streaming'\), got 'async'"),
    ],
)
def test_bad_executor_arguments(kind: str, kwargs: dict, message: str | None) -> None:
    policy = kwargs.pop("policy", RecordingRefiner())
    if message is None:
        ex = make_executor(kind, policy, 2, 4, **kwargs)
        ex.reset(batch_size=1)
        with pytest.raises(ValueError, match=r"policy chunk must have shape \[B=1, H>=9, Da\]"):
            ex.act(obs_at(0, batch=1))
        return
    with pytest.raises(ValueError, match=message):
        make_executor(kind, policy, 2, 4, **kwargs)


# -- policies: refine_action_chunk ------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "overrides"), [("diffusion_unet", {}), ("flow_unet", {"sampler": "midpoint"})])
def test_refine_from_start_1_equals_predict(name: str, overrides: dict) -> None:
    policy = tiny(name, **overrides)
    obs = obs_window()
    noise = torch.randn(2, 16, 2, generator=torch.Generator().manual_seed(3))
    steps = policy.config.num_inference_steps
    predicted = policy.predict_action_chunk(obs, noise=noise)
    for actions in (torch.zeros(2, 16, 2), torch.rand(2, 16, 2) * 500):  # irrelevant at start = 1
        refined = policy.refine_action_chunk(obs, actions, num_steps=steps, start=1.0, noise=noise)
        assert torch.equal(refined, predicted)


@pytest.mark.parametrize("name", ["diffusion_unet", "flow_unet"])
def test_refine_is_deterministic_and_keeps_a_chunk_at_low_noise(name: str) -> None:
    policy = tiny(name)
    obs = obs_window()
    actions = torch.rand(2, 16, 2) * 300 + 100  # inside the fitted action range
    noise = torch.randn(2, 16, 2, generator=torch.Generator().manual_seed(4))
    a = policy.refine_action_chunk(obs, actions, num_steps=3, start=0.3, noise=noise)
    b = policy.refine_action_chunk(obs, actions, num_steps=3, start=0.3, noise=noise)
    assert a.shape == (2, 16, 2) and torch.equal(a, b)
    assert not torch.equal(a, policy.predict_action_chunk(obs, noise=noise))
    # From (almost) no noise, one step barely moves the warm start (an untrained denoiser's error is scaled by the
    # small noise level: sqrt(1 - abar_0) ~ 0.01 for DDPM, h = 0.01 for flow).
    low = policy.refine_action_chunk(obs, actions, num_steps=1, start=0.0 if name == "diffusion_unet" else 0.01)
    torch.testing.assert_close(low, actions, atol=0.05 * 300, rtol=0)


def test_ddpm_refine_steps_through_levels_from_start_t() -> None:
    policy = tiny("diffusion_unet")  # K = 100: start 0.3 -> start_t = round(0.3 * 99) = 30
    levels = count_denoise(policy)
    policy.refine_action_chunk(obs_window(), torch.zeros(2, 16, 2), num_steps=3, start=0.3)
    assert [int(t[0]) for t in levels] == policy.schedule.timesteps(3, 30) == [30, 20, 9]
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 31\] for start_t=30, got 32"):
        policy.refine_action_chunk(obs_window(), torch.zeros(2, 16, 2), num_steps=32, start=0.3)


def test_flow_refine_integrates_from_start() -> None:
    policy = tiny("flow_unet")
    times = count_denoise(policy)
    policy.refine_action_chunk(obs_window(), torch.zeros(2, 16, 2), num_steps=3, start=0.3)
    torch.testing.assert_close(torch.stack([t[0] for t in times]), torch.tensor([0.3, 0.2, 0.1]))


@pytest.mark.parametrize("name", ["diffusion_unet", "flow_unet"])
def test_denoiser_passes_per_control_step_equal_rti_steps(name: str) -> None:
    policy = tiny(name)
    calls = count_denoise(policy)
    ex = make_executor("rti", policy, 2, 8, rti_steps=3, rti_every=1)
    ex.reset(batch_size=2)
    per_step = []
    for _ in range(4):
        before = len(calls)
        action = ex.act({"state": np.random.rand(2, 20) * 400 + 50})
        per_step.append(len(calls) - before)
        assert action.shape == (2, 2)
    assert per_step == [policy.config.num_inference_steps, 3, 3, 3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"actions": torch.zeros(2, 15, 2)}, r"actions has shape \[2, 15, 2\], expected \[2, 16, 2\]"),
        ({"start": 1.5}, r"start must be a float in \[0, 1\], got 1.5"),
    ],
)
def test_refine_bad_inputs(kwargs: dict, message: str) -> None:
    policy = tiny("diffusion_unet")
    args = {"actions": torch.zeros(2, 16, 2), "num_steps": 2, "start": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        policy.refine_action_chunk(obs_window(), **args)
    flow_policy = tiny("flow_unet")
    with pytest.raises(ValueError, match=r"start must be a float in \(0, 1\], got 0.0"):
        flow_policy.refine_action_chunk(obs_window(), torch.zeros(2, 16, 2), num_steps=2, start=0.0)


@pytest.mark.parametrize("name", ["diffusion_unet", "flow_unet"])
def test_action_scale_widens_the_normalized_range_and_sampling_clip(name: str) -> None:
    policy = tiny(name, action_scale=[1.0, 4.0])
    lo, hi = torch.tensor([[100.0, 100.0]]), torch.tensor([[400.0, 400.0]])
    span = policy.normalizer.normalize("action", torch.cat([lo, hi]))
    assert span[:, 1].abs().max() > 3.5  # the scaled dim spans about [-4, 4]
    actions = torch.rand(2, 16, 2) * 200 + 150
    torch.testing.assert_close(
        policy.normalizer.unnormalize("action", policy.normalizer.normalize("action", actions)), actions
    )
    # A chunk near the top of the range survives a low-noise refinement: clipping uses [-4, 4] for the scaled dim.
    top = torch.full((2, 16, 2), 390.0)
    low = policy.refine_action_chunk(obs_window(), top, num_steps=1, start=0.0 if name == "diffusion_unet" else 0.01)
    torch.testing.assert_close(low, top, atol=0.05 * 300, rtol=0)
    # ... and every dim of a sample stays inside its own fitted range (the unscaled dim is not clipped at +-4).
    pred = policy.predict_action_chunk(obs_window())
    assert bool(
        (pred >= policy.normalizer.action_min - 1e-3).all() and (pred <= policy.normalizer.action_max + 1e-3).all()
    )
    with pytest.raises(ValueError, match=r"action_scale must have one factor per action dim \(2\), got \[2.0\]"):
        tiny(name, action_scale=[2.0])


def test_evaluate_runs_rti_with_options() -> None:
    from envs.evaluate import evaluate

    policy = tiny("diffusion_unet")
    calls = count_denoise(policy)
    result = evaluate(
        policy,
        obs_mode="state",
        n_episodes=2,
        n_envs=2,
        max_steps=4,
        n_obs_steps=2,
        n_action_steps=8,
        executor="rti",
        executor_options={"rti_steps": 2, "rti_start": 0.5, "rti_every": 1},
        progress=False,
    )
    assert result.lengths == [4, 4] and 0.0 <= result.score <= 1.0
    assert len(calls) == policy.config.num_inference_steps + 3 * 2  # one batched full sample, then 2 per step
    with pytest.raises(ValueError, match=r"unknown options \['rti_step'\]"):
        evaluate(
            policy,
            obs_mode="state",
            n_episodes=1,
            n_obs_steps=2,
            n_action_steps=8,
            executor="rti",
            executor_options={"rti_step": 2},
            progress=False,
        )
