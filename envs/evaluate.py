"""Simulator evaluation (Push-T with Diffusion Policy's protocol by default); shared by training, `eval`, RL and
deployment.

Test seeds are seed_start .. seed_start + n_episodes - 1 (Diffusion Policy: 100000..100049). Episodes run in
rounds of `n_envs` parallel environments that replan together through one ChunkExecutor. Per episode:
max reward = max_t reward_t, success = the episode terminated (the env ends an episode on success), length = steps
taken; score = mean max reward. Push-T's reward is clip(coverage / 0.95, 0, 1) and it terminates at coverage > 0.95,
so the score is the number Diffusion Policy reports. Other tasks pass their own ``env_fn`` whose env follows the
same two rules (reward in [0, 1], terminated = success).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
import torch
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv
from tqdm import tqdm

from envs.executor import ChunkPolicy, check_int, make_executor
from envs.pusht import OBS_MODES, PushTEnv

VIDEO_FPS = 10  # the control rate, so videos play in real time
# "fork" starts workers in milliseconds and they never touch torch; forkserver/spawn re-import gymnasium,
# pygame and pymunk in every worker (about 1 s each), which dominates short evaluations.
MP_CONTEXT = "fork"
MAX_DEFAULT_ENVS = 25


@dataclasses.dataclass
class EvalResult:
    score: float  # mean over episodes of the max reward
    success_rate: float
    mean_length: float
    n_episodes: int
    seeds: list[int]
    max_rewards: list[float]
    successes: list[bool]
    lengths: list[int]
    video_path: str | None
    wall_time_s: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _default_n_envs(n_episodes: int) -> int:
    # The policy runs once per replan for all envs of a round, in this process: batching many envs amortises
    # inference, which dominates rollouts (the envs themselves step in about a millisecond). 50 Push-T episodes
    # with a DDIM-10 UNet took 54 s with 25 envs on 2 cores.
    return max(1, min(n_episodes, MAX_DEFAULT_ENVS))


def make_vector_envs(n_envs: int, obs_mode: str, max_steps: int) -> gym.vector.VectorEnv:
    """``n_envs`` Push-T envs for lockstep rounds (evaluation here, RL rollouts in ``rl.env_loop``)."""
    return vectorize(functools.partial(PushTEnv, obs_mode=obs_mode, max_steps=max_steps), n_envs)


def vectorize(env_fn: Callable[[], gym.Env], n_envs: int) -> gym.vector.VectorEnv:
    """``n_envs`` copies of ``env_fn()`` stepping in lockstep (worker processes when ``n_envs > 1``)."""
    # NEXT_STEP autoreset: a finished env is reset on the following step; its results are already recorded
    # and it is ignored until the round ends, so every env of a round can keep stepping in lockstep.
    if n_envs == 1:
        return SyncVectorEnv([env_fn], autoreset_mode=AutoresetMode.NEXT_STEP)
    return AsyncVectorEnv([env_fn] * n_envs, context=MP_CONTEXT, autoreset_mode=AutoresetMode.NEXT_STEP)


def evaluate(
    policy: ChunkPolicy,
    *,
    obs_mode: str | None = None,
    env_fn: Callable[[], gym.Env] | None = None,
    n_episodes: int = 50,
    seed_start: int = 100000,
    n_envs: int | None = None,
    max_steps: int = 300,
    n_obs_steps: int,
    n_action_steps: int,
    temporal_ensemble: float | None = None,
    executor: str | None = None,
    executor_options: Mapping[str, Any] | None = None,
    video_path: str | Path | None = None,
    n_video_episodes: int = 1,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> EvalResult:
    """Roll out `policy` on the test seeds and score it; videos show the first episodes.

    The environment: Push-T in `obs_mode` ("state", "image", "state_image"), or any `env_fn` (a picklable
    zero-argument factory; its env's `reset(seed=)` draws the initial state, its reward lies in [0, 1] and it
    terminates on success; `max_steps` is then the env's business and not used here). Give exactly one.

    `executor`: one of `envs.executor.EXECUTORS` ("chunk", "ensemble", "rti", "streaming"); None takes the policy's
    `default_executor` attribute if it has one (Streaming DP: "streaming"), else "chunk". `executor_options` go to
    `make_executor` as keyword options (RTI's rti_steps / rti_start / rti_every, discrete_dims / snap_values), which
    rejects the ones the kind does not take. Every executor serves all n_envs in lockstep."""
    if (obs_mode is None) == (env_fn is None):
        raise ValueError("evaluate() takes exactly one of obs_mode (Push-T) and env_fn (any other task)")
    if env_fn is None and obs_mode not in OBS_MODES:
        raise ValueError(f"obs_mode must be one of {OBS_MODES}, got {obs_mode!r}")
    check_int("n_episodes", n_episodes, 1)
    check_int("seed_start", seed_start, 0)
    check_int("max_steps", max_steps, 1)
    check_int("n_video_episodes", n_video_episodes, 0)
    n_envs = _default_n_envs(n_episodes) if n_envs is None else n_envs
    check_int("n_envs", n_envs, 1)
    n_envs = min(n_envs, n_episodes)
    kind = executor if executor is not None else getattr(policy, "default_executor", "chunk")
    runner = make_executor(
        kind, policy, n_obs_steps, n_action_steps, temporal_ensemble, device, **(executor_options or {})
    )

    start = time.perf_counter()
    seeds = list(range(seed_start, seed_start + n_episodes))
    max_rewards = np.zeros(n_episodes)
    successes = np.zeros(n_episodes, dtype=bool)
    lengths = np.zeros(n_episodes, dtype=np.int64)
    n_video = min(n_video_episodes, n_episodes) if video_path is not None else 0
    frames: list[list[np.ndarray]] = [[] for _ in range(n_video)]  # episode -> frames
    envs = make_vector_envs(n_envs, obs_mode, max_steps) if env_fn is None else vectorize(env_fn, n_envs)
    bar = tqdm(total=n_episodes, desc="eval", unit="episode", disable=not progress)
    try:
        for first in range(0, n_episodes, n_envs):
            ep = np.arange(first, min(first + n_envs, n_episodes))  # episode index of each used env
            n = len(ep)
            # The last round may be smaller than n_envs: the spare envs rerun the round's last seed, start
            # "done" and are ignored.
            round_seeds = [seeds[i] for i in ep] + [seeds[ep[-1]]] * (n_envs - n)
            obs, _ = envs.reset(seed=round_seeds)
            runner.reset(n_envs)
            done = np.arange(n_envs) >= n
            record = [i for i in range(n) if ep[i] < n_video]
            _record_frames(envs, record, ep, frames)
            while not done.all():
                obs, reward, terminated, truncated, _ = envs.step(runner.act(obs))
                live = np.flatnonzero(~done)
                max_rewards[ep[live]] = np.maximum(max_rewards[ep[live]], reward[live])
                successes[ep[live]] |= terminated[live]
                lengths[ep[live]] += 1
                _record_frames(envs, [i for i in record if not done[i]], ep, frames)
                finished = ~done & (terminated | truncated)
                done |= finished
                bar.update(int(finished.sum()))
    finally:
        bar.close()
        envs.close()

    if video_path is not None and n_video:
        video_path = Path(video_path)
        video_path.parent.mkdir(parents=True, exist_ok=True)
        all_frames = [frame for episode in frames for frame in episode]
        if video_path.suffix.lower() == ".gif":
            imageio.mimwrite(video_path, all_frames, duration=1000 / VIDEO_FPS, loop=0)  # duration in ms
        else:
            imageio.mimwrite(video_path, all_frames, fps=VIDEO_FPS)
    return EvalResult(
        score=float(max_rewards.mean()),
        success_rate=float(successes.mean()),
        mean_length=float(lengths.mean()),
        n_episodes=n_episodes,
        seeds=seeds,
        max_rewards=max_rewards.tolist(),
        successes=successes.tolist(),
        lengths=lengths.tolist(),
        video_path=str(video_path) if video_path is not None and n_video else None,
        wall_time_s=time.perf_counter() - start,
    )


def _record_frames(
    envs: gym.vector.VectorEnv, record: list[int], ep: np.ndarray, frames: list[list[np.ndarray]]
) -> None:
    if not record:
        return
    images = envs.call("render")  # renders every env; only rounds that contain video episodes pay for it
    for i in record:
        frames[ep[i]].append(images[i])
