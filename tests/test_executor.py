"""ChunkExecutor: replanning schedule, chunk alignment, history padding, ensembling, bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from envs.executor import ChunkExecutor

HORIZON = 8


class CountingPolicy:
    """Deterministic chunk: action[b, h] = (100 * call + h, b), call counting from 0; records its inputs."""

    def __init__(self, horizon: int = HORIZON) -> None:
        self.horizon = horizon
        self.calls: list[dict[str, torch.Tensor]] = []

    def predict_action_chunk(self, obs: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        batch = next(iter(obs.values())).shape[0]
        call = len(self.calls)
        self.calls.append({key: value.clone() for key, value in obs.items()})
        h = torch.arange(self.horizon, dtype=torch.float32)
        first = (100 * call + h).expand(batch, -1)  # [B, H]
        second = torch.arange(batch, dtype=torch.float32)[:, None].expand(-1, self.horizon)  # [B, H]
        return torch.stack([first, second], dim=-1)  # [B, H, 2]


def obs_at(t: int, batch: int = 2) -> dict[str, np.ndarray]:
    """Observation at step t: "x" [B, 3] and "img" [B, 1, 2, 2], values encode (t, env)."""
    x = np.array([[t, b, 0.5] for b in range(batch)], dtype=np.float64)
    img = np.full((batch, 1, 2, 2), float(t))
    return {"x": x, "img": img}


def test_replans_every_n_action_steps_and_executes_aligned_slice() -> None:
    policy = CountingPolicy()
    executor = ChunkExecutor(policy, n_obs_steps=2, n_action_steps=3)
    executor.reset(batch_size=2)
    actions = [executor.act(obs_at(t)) for t in range(7)]
    assert len(policy.calls) == 3  # steps 0, 3, 6
    # Diffusion Policy executes chunk[To-1 : To-1+Ta] = indices 1, 2, 3 of each chunk.
    expected = [1, 2, 3, 101, 102, 103, 201]
    assert [a[0, 0] for a in actions] == expected
    assert all(a.shape == (2, 2) for a in actions)
    np.testing.assert_array_equal(actions[4][:, 1], [0.0, 1.0])  # per-env actions stay per env


def test_first_step_pads_history_by_repetition_then_slides() -> None:
    policy = CountingPolicy()
    executor = ChunkExecutor(policy, n_obs_steps=3, n_action_steps=2)
    executor.reset(batch_size=2)
    for t in range(5):
        executor.act(obs_at(t))
    first, third = policy.calls[0], policy.calls[2]  # queried at steps 0 and 4
    assert first["x"].shape == (2, 3, 3) and first["x"].dtype == torch.float32
    assert first["img"].shape == (2, 3, 1, 2, 2)
    np.testing.assert_array_equal(first["x"][:, :, 0].numpy(), [[0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(third["x"][:, :, 0].numpy(), [[2, 3, 4], [2, 3, 4]])  # oldest first
    np.testing.assert_array_equal(third["x"][:, :, 1].numpy(), [[0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(third["img"][:, :, 0, 0, 0].numpy(), [[2, 3, 4], [2, 3, 4]])


def test_history_is_copied_not_aliased() -> None:
    policy = CountingPolicy()
    executor = ChunkExecutor(policy, n_obs_steps=2, n_action_steps=2)
    executor.reset(batch_size=1)
    buffer = {"x": np.zeros((1, 1))}
    executor.act(buffer)
    buffer["x"][:] = 5.0  # a vector env reusing its buffer must not rewrite the history
    executor.act(buffer)
    executor.act(buffer)
    np.testing.assert_array_equal(policy.calls[1]["x"][0, :, 0].numpy(), [5.0, 5.0])
    np.testing.assert_array_equal(policy.calls[0]["x"][0, :, 0].numpy(), [0.0, 0.0])


def test_temporal_ensemble_hand_computed() -> None:
    policy = CountingPolicy()
    k = 0.5
    executor = ChunkExecutor(policy, n_obs_steps=1, n_action_steps=3, temporal_ensemble=k)
    executor.reset(batch_size=2)
    actions = [executor.act(obs_at(t))[0, 0] for t in range(4)]
    assert len(policy.calls) == 4  # queried every step
    # Chunk c (predicted at step c) gives 100c + h for step c + h (offset To-1 = 0), valid for h < 3.
    w = np.exp(-k * np.arange(3))
    expected = [
        0.0,
        (w[0] * 1 + w[1] * 100) / w[:2].sum(),
        (w[0] * 2 + w[1] * 101 + w[2] * 200) / w.sum(),
        (w[0] * 102 + w[1] * 201 + w[2] * 300) / w.sum(),  # chunk 0 no longer reaches step 3
    ]
    np.testing.assert_allclose(actions, expected, rtol=1e-6)


def test_temporal_ensemble_zero_decay_is_plain_mean() -> None:
    executor = ChunkExecutor(CountingPolicy(), n_obs_steps=2, n_action_steps=2, temporal_ensemble=0.0)
    executor.reset(batch_size=1)
    actions = [executor.act(obs_at(t, batch=1))[0, 0] for t in range(2)]
    assert actions == [1.0, (2.0 + 101.0) / 2]  # offset To-1 = 1


def test_reset_clears_history_and_queue() -> None:
    policy = CountingPolicy()
    executor = ChunkExecutor(policy, n_obs_steps=2, n_action_steps=4)
    executor.reset(batch_size=2)
    executor.act(obs_at(0))
    executor.act(obs_at(1))
    executor.reset(batch_size=3)
    action = executor.act(obs_at(7, batch=3))
    assert len(policy.calls) == 2  # the old queue was dropped, so it replanned at once
    assert action.shape == (3, 2) and action[0, 0] == 101.0
    np.testing.assert_array_equal(policy.calls[1]["x"][:, :, 0].numpy(), np.full((3, 2), 7.0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_obs_steps": 0, "n_action_steps": 1}, "n_obs_steps must be an int >= 1, got 0"),
        ({"n_obs_steps": 2, "n_action_steps": 0}, "n_action_steps must be an int >= 1, got 0"),
        ({"n_obs_steps": 2, "n_action_steps": 2.5}, "n_action_steps must be an int >= 1, got 2.5"),
        (
            {"n_obs_steps": 2, "n_action_steps": 2, "action_offset": -1},
            "action_offset must be an int >= 0, got -1",
        ),
        (
            {"n_obs_steps": 2, "n_action_steps": 2, "temporal_ensemble": -0.1},
            "temporal_ensemble must be a finite float >= 0 or None, got -0.1",
        ),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChunkExecutor(CountingPolicy(), **kwargs)


def test_bad_runtime_inputs_raise() -> None:
    executor = ChunkExecutor(CountingPolicy(), n_obs_steps=2, n_action_steps=2)
    with pytest.raises(RuntimeError, match="reset"):
        executor.act(obs_at(0))
    executor.reset(batch_size=2)
    with pytest.raises(ValueError, match=r"obs\['x'\] must have shape \[B=2, \.\.\.\], got shape \(3, 3\)"):
        executor.act({"x": np.zeros((3, 3))})
    executor.reset(batch_size=2)
    executor.act(obs_at(0))
    with pytest.raises(ValueError, match=r"obs keys must stay \['img', 'x'\] within an episode, got \['x'\]"):
        executor.act({"x": np.zeros((2, 3))})
    short = ChunkExecutor(CountingPolicy(horizon=4), n_obs_steps=2, n_action_steps=4)
    short.reset(batch_size=2)
    with pytest.raises(ValueError, match=r"policy chunk must have shape \[B=2, H>=5, Da\].*got \(2, 4, 2\)"):
        short.act(obs_at(0))
