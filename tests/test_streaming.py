"""Streaming Diffusion Policy: chunk layout, per-action training levels, buffer shift/append, executor ownership."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.pusht import shape_meta
from envs.executor import ChunkExecutor, StreamingExecutor, make_executor
from policies.registry import make_policy
from policies.streaming import StreamingConfig, chunk_index


def make(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = StreamingConfig(down_dims=[16, 32], diffusion_step_embed_dim=16, **overrides)
    policy = make_policy(config, shape_meta("state"))
    policy.fit_normalizer({"state": torch.rand(64, 20) * 400, "action": torch.rand(64, 2) * 300 + 100})
    return policy.eval()


def obs(b: int = 2) -> dict[str, torch.Tensor]:
    return {"state": torch.rand(b, 2, 20, generator=torch.Generator().manual_seed(0)) * 400}


class Spy:
    """Records the levels every denoiser pass receives (wraps the real network)."""

    def __init__(self, policy) -> None:
        self.levels: list[torch.Tensor] = []
        self._denoise = policy.denoise
        policy.denoise = self

    def __call__(self, x, t, cond):
        self.levels.append(t.clone())
        return self._denoise(x, t, cond)


def test_chunk_layout_exact_tiling_and_remainder():
    # H=16, To=2, Ta=5: one past step + 3 chunks of 5.
    assert chunk_index(16, 2, 5).tolist() == [0] * 6 + [1] * 5 + [2] * 5
    # Ta=4: 3 chunks, the 3-step remainder joins the last chunk.
    assert chunk_index(16, 2, 4).tolist() == [0] * 5 + [1] * 4 + [2] * 7


def test_config_validation():
    with pytest.raises(ValueError, match="num_inference_steps must be divisible by the number of chunks .* = 3, got 1"):
        StreamingConfig(num_inference_steps=10)
    with pytest.raises(ValueError, match="constant_level_prob must be in"):
        StreamingConfig(constant_level_prob=1.5)


def test_training_levels_mix_constant_and_chunkwise():
    policy = make()
    torch.manual_seed(0)
    t = policy.training_levels(4000, torch.device("cpu"))
    assert t.shape == (4000, 16) and t.min() >= 0 and t.max() <= 99
    constant = (t == t[:, :1]).all(dim=1)
    assert abs(constant.float().mean().item() - 0.2) < 0.03  # constant_level_prob
    cw = t[~constant]
    # Chunk-wise rows: one level per chunk, k(c) = floor(100 (c+1) / 3) - 1 - j, j in [0, 33).
    j = 32 - cw[:, 0]
    assert j.min() >= 0 and j.max() <= 32
    assert torch.equal(cw[:, 6], 65 - j) and torch.equal(cw[:, 11], 99 - j)
    assert (cw[:, :6] == cw[:, :1]).all() and (cw[:, 6:11] == cw[:, 6:7]).all()


def test_loss_uses_per_action_levels():
    policy = make().train()
    spy = Spy(policy)
    batch = {"obs": obs(8), "action": torch.rand(8, 16, 2) * 300 + 100}
    loss, _ = policy.compute_loss(batch)
    assert torch.isfinite(loss) and spy.levels[0].shape == (8, 16)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_stream_feeds_each_position_its_own_level(sampler):
    policy = make(sampler=sampler)
    spy = Spy(policy)
    chunk, buffer = policy.stream(obs())
    # Episode start: one full sampling pass over N = 6 listed levels, the same level for every position.
    assert [t.flatten()[0].item() for t in spy.levels] == [99, 82, 66, 49, 32, 16]
    assert all((t == t.flatten()[0]).all() for t in spy.levels)
    spy.levels.clear()
    policy.stream(obs(), buffer)
    # Later observations: s = N / h = 2 passes; chunk c enters at stage (c+1) s - 1 and steps down one stage per pass.
    assert len(spy.levels) == 2
    expected = [[32] * 6 + [66] * 5 + [99] * 5, [16] * 6 + [49] * 5 + [82] * 5]
    assert [t[0].tolist() for t in spy.levels] == expected


def test_shift_appends_noise_and_renoises_the_past():
    policy = make()
    torch.manual_seed(1)
    _, buffer = policy.stream(obs())
    g = torch.Generator().manual_seed(5)
    shifted = policy._shift(buffer, g)
    # Chunks 1 and 2 move into chunk 0 and 1's slots unchanged (they are already at the stage those slots need).
    torch.testing.assert_close(shifted[:, 1:11], buffer[:, 6:16])
    # The last chunk restarts from pure noise: the first draw of the generator.
    fresh = torch.randn(buffer.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(shifted[:, 11:], fresh[:, 11:])
    # The past position now holds the clean action executed last (buffer[:, 5]), re-noised to chunk 0's entry level
    # (stage s - 1 = 1, DDPM level 32): x = sqrt(abar) x0 + sqrt(1 - abar) eps with the generator's second draw.
    g2 = torch.Generator().manual_seed(5)
    torch.randn(buffer.shape, generator=g2)  # the fresh noise
    eps = torch.randn(buffer.shape, generator=g2)
    abar = policy.schedule.alphas_cumprod[32]
    torch.testing.assert_close(shifted[:, 0], abar.sqrt() * buffer[:, 5] + (1 - abar).sqrt() * eps[:, 0])


def test_first_chunk_is_clean_after_the_passes():
    # With an oracle denoiser that knows the clean chunk, the executed chunk must come out exactly clean for both
    # samplers: the last pass of chunk 0 goes to level -1 with the DDIM / DDPM-posterior update.
    for sampler in ("ddim", "ddpm"):
        policy = make(sampler=sampler)
        target = torch.rand(2, 16, 2) * 1.6 - 0.8  # normalized clean actions

        def oracle(x, t, cond, target=target, policy=policy):
            abar = policy.schedule.alphas_cumprod[t]
            abar = abar[:, None, None] if t.ndim == 1 else abar[..., None]  # [B] or [B, H] levels
            return (x - abar.sqrt() * target) / (1 - abar).sqrt()

        policy.denoise = oracle
        _, buffer = policy.stream(obs())
        torch.testing.assert_close(buffer[:, :6], target[:, :6], atol=1e-5, rtol=0)
        target.copy_(torch.cat([target[:, 5:], target[:, :5]], dim=1))  # the next chunk the buffer should reach
        _, buffer = policy.stream(obs(), buffer)
        torch.testing.assert_close(buffer[:, 1:6], target[:, 1:6], atol=1e-5, rtol=0)


def test_streaming_executor_owns_the_buffer():
    policy = make()
    calls: list[torch.Tensor | None] = []
    stream = policy.stream

    def recording_stream(o, buffer=None):
        calls.append(buffer)
        return stream(o, buffer)

    policy.stream = recording_stream
    ex = make_executor("streaming", policy, n_obs_steps=2, n_action_steps=5)
    assert isinstance(ex, StreamingExecutor)
    ex.reset(2)
    for _ in range(11):
        action = ex.act({"state": np.random.rand(2, 20).astype(np.float32) * 400})
        assert action.shape == (2, 2)
    # Queried at steps 0, 5 and 10; every later query receives the buffer the previous one returned.
    assert len(calls) == 3 and calls[0] is None and calls[1] is not None and calls[2] is not calls[1]
    ex.reset(2)
    ex.act({"state": np.random.rand(2, 20).astype(np.float32) * 400})
    assert calls[-1] is None  # a new episode starts from a fresh buffer
    assert type(make_executor("chunk", policy, 2, 5)) is ChunkExecutor
    with pytest.raises(ValueError, match="executor must be one of"):
        make_executor("nope", policy, 2, 5)
    with pytest.raises(ValueError, match="needs a policy with stream"):
        make_executor("streaming", object(), 2, 5)
