"""The inference worker process (deploy.inference): handshake, sync and async chunks with their timestamps, the same
actions as the in-process ActionSource, reset, worker errors and a dead worker.

Sampling noise: a DDIM chunk is deterministic only given its initial noise, and the noise cannot be injected across
the process boundary through the ChunkProvider interface. Both sides therefore draw it from torch's default
generator seeded with the same value right after loading (the worker's ``seed`` argument; ``torch.manual_seed`` here),
and both make the same sequence of draws, so the actions must agree to float32 round-off.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch
from test_deploy_source import TINY, obs_at, save_tiny_checkpoint

from deploy.inference import InferenceError, InferenceProcess
from deploy.source import ObsWindow, load_action_source
from deploy.types import Observation, TimedChunk


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("inference") / "ckpt")


def wait_chunk(provider: InferenceProcess, timeout_s: float = 10.0) -> TimedChunk:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        chunk = provider.poll()
        if chunk is not None:
            return chunk
        time.sleep(0.0005)
    raise AssertionError(f"no chunk within {timeout_s} s")


def test_sync_worker_returns_one_action_per_request_equal_to_in_process(tiny_checkpoint) -> None:
    with InferenceProcess(tiny_checkpoint, executor="chunk", mode="sync", dt=0.1, seed=7) as provider:
        assert (provider.action_dim, provider.n_obs_steps, provider.n_action_steps) == (2, 2, 4)
        assert (provider.executor, provider.policy_type) == ("chunk", "diffusion_unet")
        remote = []
        for t in range(6):
            stamp = time.monotonic()
            assert provider.request(Observation(obs_at(t), stamp))
            assert not provider.request(Observation(obs_at(t), stamp))  # one request at a time
            chunk = wait_chunk(provider)
            assert chunk.actions.shape == (1, 2)
            assert chunk.t0 == stamp and chunk.t_obs == stamp and chunk.dt == 0.1
            assert 0 < chunk.inference_s <= provider.last_latency_s
            remote.append(chunk.actions[0])
        assert provider.poll() is None
    source = load_action_source(tiny_checkpoint, executor="chunk")
    torch.manual_seed(7)
    local = [source.act(obs_at(t)) for t in range(6)]
    np.testing.assert_allclose(np.array(remote), np.array(local), rtol=1e-5, atol=1e-4)


def test_async_worker_returns_timestamped_chunks_from_its_own_window(tiny_checkpoint) -> None:
    n = TINY["horizon"] - TINY["n_obs_steps"] + 1
    with InferenceProcess(tiny_checkpoint, mode="async", dt=0.05, seed=3, num_inference_steps=2) as provider:
        chunks = []
        for t in range(3):
            stamp = time.monotonic()
            assert provider.request(Observation(obs_at(t), stamp))
            chunks.append(wait_chunk(provider))
            assert chunks[-1].actions.shape == (n, 2)
            np.testing.assert_allclose(chunks[-1].times, stamp + 0.05 * np.arange(n))
        provider.reset()  # new episode: the worker's window restarts from the next observation
        assert provider.request(Observation(obs_at(10), time.monotonic()))
        chunks.append(wait_chunk(provider))
    source = load_action_source(tiny_checkpoint, num_inference_steps=2)
    window = ObsWindow(source.n_obs_steps)
    torch.manual_seed(3)
    local = [source.chunk(window.push(obs_at(t))) for t in range(3)]
    window.clear()
    local.append(source.chunk(window.push(obs_at(10))))
    for chunk, expected in zip(chunks, local, strict=True):
        np.testing.assert_allclose(chunk.actions, expected, rtol=1e-5, atol=1e-4)


def test_async_window_holds_every_observed_frame_not_only_requested_ones(tiny_checkpoint) -> None:
    FRAMES = (0, 90, 10)  # far apart, so that the tiny random policy's chunk visibly depends on the window
    # Chunks are requested every few policy ticks, but the policy's window must hold consecutive policy-tick frames.
    with InferenceProcess(tiny_checkpoint, mode="async", dt=0.1, seed=5, num_inference_steps=2) as provider:
        for i, t in enumerate(FRAMES):
            provider.observe(Observation(obs_at(t), 10.0 + i))
        assert provider.request(Observation(obs_at(FRAMES[-1]), 12.0))  # the frame observed last: not pushed twice
        remote = wait_chunk(provider)
    source = load_action_source(tiny_checkpoint, num_inference_steps=2)
    window = ObsWindow(source.n_obs_steps)
    for t in FRAMES:
        window.push(obs_at(t))
    torch.manual_seed(5)
    np.testing.assert_allclose(remote.actions, source.chunk(window.window()), rtol=1e-5, atol=1e-4)
    torch.manual_seed(5)
    stale = ObsWindow(source.n_obs_steps)
    stale.push(obs_at(FRAMES[-1]))  # what a request-only window would hold
    assert not np.allclose(remote.actions, source.chunk(stale.window()), atol=1e-4)


def test_reset_drops_a_result_still_in_flight(tiny_checkpoint) -> None:
    with InferenceProcess(tiny_checkpoint, mode="async", dt=0.1) as provider:
        assert provider.request(Observation(obs_at(0), 1.0))
        provider.reset()
        assert provider.request(Observation(obs_at(1), 2.0))  # reset cleared the pending request
        chunk = wait_chunk(provider)
        assert chunk.t_obs == 2.0  # the answer to the first request was dropped
        time.sleep(0.05)
        assert provider.poll() is None


def test_worker_errors_and_death_raise_clear_errors(tiny_checkpoint) -> None:
    provider = InferenceProcess(tiny_checkpoint, mode="sync", dt=0.1)
    try:
        provider.request(Observation({"pos": np.zeros(5)}, time.monotonic()))
        with pytest.raises(InferenceError, match="ValueError: observation keys must be \\['state'\\]"):
            wait_chunk(provider)
        with pytest.raises(InferenceError, match="observation keys"):
            provider.request(Observation(obs_at(0), time.monotonic()))  # the error stays raised
    finally:
        provider.close()
    provider = InferenceProcess(tiny_checkpoint, mode="sync", dt=0.1)
    try:
        os.kill(provider.pid, signal.SIGKILL)
        with pytest.raises(InferenceError, match=f"pid {provider.pid}\\) exited with code -9"):
            wait_chunk(provider)
    finally:
        provider.close()
    with pytest.raises(InferenceError, match="closed"):
        provider.poll()


def test_start_up_errors_come_back_with_the_worker_message(tiny_checkpoint, tmp_path) -> None:
    with pytest.raises(ValueError, match="failed to start: .*'lr'.*num_inference_steps"):
        InferenceProcess(tiny_checkpoint, mode="sync", dt=0.1, lr=1e-4)
    with pytest.raises(InferenceError, match="does not exist"):
        InferenceProcess(tmp_path / "missing", dt=0.1)
    with pytest.raises(ValueError, match="mode must be one of"):
        InferenceProcess(tiny_checkpoint, mode="later")
    with pytest.raises(ValueError, match="dt must be a finite number > 0, got 0"):
        InferenceProcess(tiny_checkpoint, dt=0)


def test_sending_to_a_dead_worker_raises_and_close_still_works(tiny_checkpoint) -> None:
    provider = InferenceProcess(tiny_checkpoint, mode="async", dt=0.1)
    os.kill(provider.pid, signal.SIGKILL)
    provider._proc.wait()
    with pytest.raises(InferenceError, match="exited with code -9"):
        for t in range(100):  # the first write may still fit the pipe; the EOF or a broken pipe follows
            provider.request(Observation(obs_at(t), time.monotonic()))
            provider.poll()
    provider.close()
