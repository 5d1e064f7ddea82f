"""MetaWorld v3 (Yu et al. 2019; Farama's metaworld 3.x, gymnasium API): single tasks and MT10, scripted-expert
demonstrations in our zarr layout, and evaluation through ``envs.evaluate``.

Tasks: ``metaworld/<env>`` (any of the 50 v3 envs, e.g. ``metaworld/push-v3``) and ``metaworld/mt10`` (the ten MT10
envs, task id = position in ``MT10_TASKS``, MetaWorld's own MT10 order).

Observations (numpy, per env):
- ``state`` float32 [39]: MetaWorld's observation (hand xyz, gripper opening, two objects' pose padded to 14, the
  same 18 numbers of the previous step, goal xyz). The goal is observable, as in MetaWorld's MT benchmarks.
- with ``task.image_size`` S set (image observations), instead of ``state``: ``image`` float32 [3, S, S] in [0, 1],
  the ``corner`` camera rendered offscreen by MuJoCo (needs an OpenGL backend: MUJOCO_GL=osmesa or egl), and
  ``agent_pos`` float32 [4] (hand xyz + gripper opening, the first four numbers of the state): what a robot with a
  camera observes, without the privileged object poses.
- multi-task only: ``task`` int64 [] (MoDE's task token: ``policies.mode`` reads ``obs["task"]``) and
  ``task_onehot`` float32 [n_tasks]. Policies that concatenate their low-dimensional keys (Diffusion Policy,
  transformer, flow) see the task through the one-hot; ``task`` has shape [] so no policy normalizes it as a feature.
Actions: float32 [4] in [-1, 1] (hand xyz displacement, gripper effort); the env clips them as MetaWorld does.

Seeds: ``reset(seed=s)`` seeds MetaWorld's ``np_random`` and draws the object/goal placement from it
(``seeded_rand_vec``, MetaWorld's own seeded variation), so one seed gives one initial state in any process.
Demonstrations use seeds ``seed .. seed + n - 1`` (0.. by default), evaluation ``eval_seed_start ..``
(100000.. by default); ``generate`` refuses overlapping ranges.

Evaluation protocol (``envs.evaluate``'s rules): reward = 1 on success, else MetaWorld's v2 shaped reward / 10
(MetaWorld documents it in [0, 10]), so the score is the mean best progress and 1 means success; the episode
terminates on ``info["success"]`` and is truncated after ``task.max_steps`` (MetaWorld's 500 by default in
configs/task/metaworld/). Success rate over the fixed seeds, per task and averaged (MT10).

Demonstrations: MetaWorld's scripted expert (``metaworld.policies.ENV_POLICY_MAP``) on the raw observation, with
optional Gaussian noise ``N(0, action_noise^2)`` added to the expert action (then clipped to [-1, 1]); the executed
action is recorded. An episode ends at its first success or at ``max_steps``. Store (``data.replay_buffer``):
``data/state [N, 39] float32``, ``data/action [N, 4] float32``, ``data/reward [N] float32``, ``data/success [N] bool``
(step t reached success), ``data/task [N] int64``, ``meta/episode_ends``, and with ``image_size`` S also
``data/image [N, S, S, 3] uint8`` (the render before each action). Failed demos are kept and flagged (their
last ``success`` is False); imitation (``datasets()``) trains on the successful episodes only, offline RL
(``transitions=True``) on all of them, with reward and terminal = success.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from data.replay_buffer import ReplayBuffer
from data.sequence import SequenceDataset, split_episodes
from envs.evaluate import EvalResult, evaluate
from envs.tasks import METAWORLD_TASKS, TaskConfig, dataset_path

# metaworld.env_dict.MT10_V3's order (tests check it): the task id of each MT10 env.
MT10_TASKS = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)
STATE_DIM, ACTION_DIM = 39, 4
MAX_REWARD = 10.0  # MetaWorld v2 rewards lie in [0, 10] (SawyerXYZEnv.evaluate_state)
CAMERA = "corner"  # one of the cameras in MetaWorld's scene files, a third-person view: rollout videos
RENDER_SIZE = 224


def env_names_of(name: str) -> tuple[str, ...]:
    """MetaWorld envs of a registered task name: ``metaworld/push-v3`` -> ("push-v3",), ``metaworld/mt10`` -> MT10."""
    prefix, _, env = name.partition("/")
    if prefix != "metaworld" or (env != "mt10" and env not in METAWORLD_TASKS):
        raise ValueError(
            f"task name must be metaworld/mt10 or metaworld/<env> with env in {METAWORLD_TASKS}, got {name!r}"
        )
    return MT10_TASKS if env == "mt10" else (env,)


AGENT_POS_DIM = 4  # hand xyz + gripper opening: state[:4]


def shape_meta(n_tasks: int, image_size: int | None = None) -> dict:
    obs: dict[str, list[int]] = {"state": [STATE_DIM]}
    if image_size is not None:
        obs = {"image": [3, image_size, image_size], "agent_pos": [AGENT_POS_DIM]}
    if n_tasks > 1:
        obs.update(task=[], task_onehot=[n_tasks])
    return {"obs": obs, "action": [ACTION_DIM]}


class MetaWorldEnv(gym.Env):
    """One MetaWorld v3 env with our evaluation rules (see the module docstring); ``task_id`` of ``n_tasks`` adds the
    task observations when ``n_tasks > 1``; ``image_size`` S observes ``image`` [3, S, S] + ``agent_pos`` [4]
    instead of ``state``. ``expert_action()`` is the scripted expert's action for the current state. ``render()``
    returns an RGB frame [H, W, 3] uint8 (needs an OpenGL backend: MUJOCO_GL=egl or osmesa)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 80}  # 12.5 ms per control step (frame_skip 5)

    def __init__(
        self, env_name: str, task_id: int = 0, n_tasks: int = 1, max_steps: int = 500, image_size: int | None = None
    ) -> None:
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
        from metaworld.policies import ENV_POLICY_MAP

        if env_name not in ALL_V3_ENVIRONMENTS:
            raise ValueError(f"env_name must be a MetaWorld v3 env {tuple(ALL_V3_ENVIRONMENTS)}, got {env_name!r}")
        if not 0 <= task_id < n_tasks:
            raise ValueError(f"task_id must be in [0, n_tasks={n_tasks}), got {task_id}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        check_image_size(image_size)
        self.env_name, self.task_id, self.n_tasks, self.max_steps = env_name, task_id, n_tasks, max_steps
        self.image_size = image_size
        size = RENDER_SIZE if image_size is None else image_size
        env = ALL_V3_ENVIRONMENTS[env_name](render_mode="rgb_array", camera_name=CAMERA, width=size, height=size)
        # MetaWorld's MT setting (env_dict._create_observable_goal_envs): goal in the observation; placements drawn
        # from the env's seeded np_random at every reset instead of a frozen Task rand_vec.
        env._partially_observable = False
        del env.sawyer_observation_space  # a cached_property that depends on _partially_observable
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env._set_task_called = True
        env.max_path_length = max_steps
        self._env, self._expert = env, ENV_POLICY_MAP[env_name]()
        self._raw: np.ndarray | None = None
        self.render_mode = "rgb_array"
        self.action_space = gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        spaces: dict[str, gym.Space] = {"state": gym.spaces.Box(-np.inf, np.inf, (STATE_DIM,), np.float32)}
        if image_size is not None:
            spaces = {
                "image": gym.spaces.Box(0.0, 1.0, (3, image_size, image_size), np.float32),
                "agent_pos": gym.spaces.Box(-np.inf, np.inf, (AGENT_POS_DIM,), np.float32),
            }
        if n_tasks > 1:
            spaces["task"] = gym.spaces.Box(0, n_tasks - 1, (), np.int64)
            spaces["task_onehot"] = gym.spaces.Box(0.0, 1.0, (n_tasks,), np.float32)
        self.observation_space = gym.spaces.Dict(spaces)

    def _obs(self) -> dict[str, np.ndarray]:
        state = self.state
        if self.image_size is None:
            obs = {"state": state}
        else:
            frame = self.render()  # [S, S, 3] uint8
            obs = {"image": np.moveaxis(frame, -1, 0).astype(np.float32) / 255.0, "agent_pos": state[:AGENT_POS_DIM]}
        if self.n_tasks > 1:
            obs["task"] = np.asarray(self.task_id, dtype=np.int64)
            obs["task_onehot"] = np.eye(self.n_tasks, dtype=np.float32)[self.task_id]
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
        super().reset(seed=seed)
        # Without a seed the placement still comes from this env's generator, which gymnasium seeds at random.
        self._env.seed(int(seed) if seed is not None else int(self.np_random.integers(2**31)))
        self._raw, _ = self._env.reset()
        return self._obs(), {"success": False}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        if self._raw is None:
            raise RuntimeError("call reset() before step()")
        action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        self._raw, reward, _, truncated, info = self._env.step(action)
        success = bool(info["success"])
        reward = 1.0 if success else float(np.clip(reward / MAX_REWARD, 0.0, 1.0))
        return self._obs(), reward, success, bool(truncated) and not success, {"success": success}

    @property
    def state(self) -> np.ndarray:
        """MetaWorld's full observation [39] float32 of the current step (recorded in demonstrations in any mode)."""
        if self._raw is None:
            raise RuntimeError("call reset() before reading the state")
        return self._raw.astype(np.float32)

    def expert_action(self) -> np.ndarray:
        """MetaWorld's scripted expert action [4] for the current (raw float64) observation."""
        if self._raw is None:
            raise RuntimeError("call reset() before expert_action()")
        return np.asarray(self._expert.get_action(self._raw), dtype=np.float32)

    def render(self) -> np.ndarray:
        # MetaWorld's corner camera comes out upside down (MuJoCo's bottom-up rows): flip to a viewer's orientation.
        return np.ascontiguousarray(self._env.render()[::-1])

    def close(self) -> None:
        self._env.close()


def check_image_size(image_size: int | None) -> None:
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8):
        raise ValueError(f"image_size must be an int >= 8 (pixels) or None for state observations, got {image_size!r}")


@functools.cache
def rendering_error() -> str | None:
    """None if MuJoCo offscreen rendering works in this process, else why not (no OpenGL backend)."""
    import mujoco

    try:
        model = mujoco.MjModel.from_xml_string("<mujoco><worldbody><geom size='1'/></worldbody></mujoco>")
        with mujoco.Renderer(model, 8, 8) as renderer:
            renderer.update_scene(mujoco.MjData(model))
            renderer.render()
    except Exception as err:  # EGLError, mujoco.FatalError, AttributeError: each GL backend fails its own way
        return f"MuJoCo offscreen rendering failed with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}: {err!r}"
    return None


@dataclasses.dataclass
class MultiTaskEvalResult(EvalResult):
    """``envs.evaluate.EvalResult`` over every task's seeds (in task order) plus the task of each episode and the
    success rate per task; ``success_rate`` is the mean over all episodes (equal episodes per task: the average of
    the per-task rates)."""

    tasks: list[str] = dataclasses.field(default_factory=list)
    success_per_task: dict[str, float] = dataclasses.field(default_factory=dict)


class MetaWorldTask:
    """The Task protocol (``envs.tasks``) for ``metaworld/<env>`` and ``metaworld/mt10``, plus ``generate``."""

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self.env_names = env_names_of(config.name)
        check_image_size(config.image_size)
        self.shape_meta = shape_meta(len(self.env_names), config.image_size)

    @property
    def dataset_path(self) -> Path:
        suffix = "" if self.config.image_size is None else f"_image{self.config.image_size}"
        return dataset_path(self.config, "metaworld", f"{self.config.name.partition('/')[2]}{suffix}.zarr")

    def env_fn(self, task_id: int) -> functools.partial:
        """A picklable factory of the env of ``env_names[task_id]`` (for ``envs.evaluate`` and RL rollouts)."""
        c = self.config
        n_tasks = len(self.env_names)
        return functools.partial(MetaWorldEnv, self.env_names[task_id], task_id, n_tasks, c.max_steps, c.image_size)

    # -- data ----------------------------------------------------------------------------------------------------
    def generate(
        self,
        n_episodes: int,
        out: str | Path | None = None,
        seed: int = 0,
        action_noise: float = 0.0,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Roll out the scripted expert for ``n_episodes`` seeds per task (``seed ..``) and save the store at ``out``
        (default ``dataset_path``) atomically. Returns a validation report: episodes, steps, success per task, the
        seeds of failed demos (kept, flagged), episode lengths."""
        c = self.config
        if isinstance(n_episodes, bool) or not isinstance(n_episodes, int) or n_episodes < 1:
            raise ValueError(f"n_episodes must be an int >= 1, got {n_episodes!r}")
        if not (np.isfinite(action_noise) and action_noise >= 0):
            raise ValueError(f"action_noise must be a finite std >= 0, got {action_noise!r}")
        if seed < 0 or (seed < c.eval_seed_start + c.eval_episodes and c.eval_seed_start < seed + n_episodes):
            raise ValueError(
                f"demonstration seeds {seed}..{seed + n_episodes - 1} must be >= 0 and must not overlap the evaluation "
                f"seeds {c.eval_seed_start}..{c.eval_seed_start + c.eval_episodes - 1} (task.eval_seed_start)"
            )
        if c.image_size is not None and rendering_error() is not None:
            raise RuntimeError(f"task.image_size={c.image_size} renders images: {rendering_error()}")
        out = Path(out).expanduser() if out is not None else self.dataset_path
        buffer = ReplayBuffer()
        failed: dict[str, list[int]] = {}
        success: dict[str, float] = {}
        bar = tqdm(
            total=n_episodes * len(self.env_names), desc=f"generate {c.name}", unit="episode", disable=not progress
        )
        for task_id, name in enumerate(self.env_names):
            env = self.env_fn(task_id)()
            # One noise stream per (seed, task): a dataset is reproducible and its episodes do not depend on each other.
            rng = np.random.default_rng([seed, task_id])
            ok = 0
            for episode_seed in range(seed, seed + n_episodes):
                episode = rollout_expert(env, episode_seed, action_noise, rng)
                buffer.add_episode({**episode, "task": np.full(len(episode["action"]), task_id, np.int64)})
                if episode["success"][-1]:
                    ok += 1
                else:
                    failed.setdefault(name, []).append(episode_seed)
                bar.update(1)
            env.close()
            success[name] = ok / n_episodes
        bar.close()
        buffer.save(out)
        lengths = buffer.episode_lengths
        return {
            "path": str(out),
            "task": c.name,
            "episodes": buffer.n_episodes,
            "steps": buffer.n_steps,
            "seeds": [seed, seed + n_episodes - 1],
            "action_noise": action_noise,
            "success_rate": float(np.mean(list(success.values()))),
            "success_per_task": success,
            "failed_seeds": failed,
            "episode_length": {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max())},
        }

    def load(self) -> ReplayBuffer:
        """The generated store, validated against this task (keys, shapes, task ids)."""
        path = self.dataset_path
        if not path.exists():
            raise FileNotFoundError(
                f"no MetaWorld data for {self.config.name} at {path}; generate it with "
                f"`robodiff data generate task={self.config.name} n_episodes=50` (or pass task.dataset_path=<store>)"
            )
        size = self.config.image_size
        keys = ["state", "action", "reward", "success", "task"] + (["image"] if size is not None else [])
        try:
            buffer = ReplayBuffer.load(path, keys=keys, image_keys=["image"] if size is not None else [])
        except KeyError as err:
            if size is None:
                raise
            raise ValueError(
                f"{path} has no rendered images ({err}); generate image data with `robodiff data generate "
                f"task={self.config.name} task.image_size={size} ...` into another store"
            ) from err
        d = buffer.data
        if size is not None and d["image"].shape[1:] != (size, size, 3):
            raise ValueError(
                f"{path}: data/image has frames {list(d['image'].shape[1:])}, expected [{size}, {size}, 3] for "
                f"task.image_size={size}"
            )
        if d["state"].shape[1:] != (STATE_DIM,) or d["action"].shape[1:] != (ACTION_DIM,):
            raise ValueError(
                f"{path}: expected data/state [N, {STATE_DIM}] and data/action [N, {ACTION_DIM}], got "
                f"{list(d['state'].shape)} and {list(d['action'].shape)}"
            )
        if buffer.n_steps and not 0 <= d["task"].min() <= d["task"].max() < len(self.env_names):
            raise ValueError(
                f"{path}: task ids must be in [0, {len(self.env_names) - 1}] for {self.config.name}, got "
                f"[{d['task'].min()}, {d['task'].max()}]; was it generated for another task?"
            )
        return buffer

    def datasets(
        self, horizon: int, n_obs_steps: int, n_action_steps: int, transitions: bool = False
    ) -> tuple[SequenceDataset, SequenceDataset]:
        """Train/validation windows split by episode (seeded); successful demos only unless ``transitions``."""
        c = self.config
        buffer = self.load()
        d = buffer.data
        ends = buffer.episode_ends
        eligible = np.ones(buffer.n_episodes, bool) if transitions else d["success"][ends - 1]
        if not eligible.any():
            raise ValueError(f"{self.dataset_path} has no successful demonstration to imitate")
        idx = np.flatnonzero(eligible)
        # episode indices of train_episodes count the eligible demos (successful ones when imitating)
        train_sub, val_sub = split_episodes(len(idx), c.val_ratio, c.split_seed, c.max_train_episodes, c.train_range)
        train_mask, val_mask = np.zeros(buffer.n_episodes, bool), np.zeros(buffer.n_episodes, bool)
        train_mask[idx[train_sub]], val_mask[idx[val_sub]] = True, True
        obs: dict[str, np.ndarray] = {"state": d["state"]}
        kwargs: dict[str, Any] = dict(horizon=horizon, n_obs_steps=n_obs_steps, n_action_steps=n_action_steps)
        if c.image_size is not None:
            obs = {"image": d["image"], "agent_pos": d["state"][:, :AGENT_POS_DIM]}
            kwargs["image_keys"] = ["image"]
        if len(self.env_names) > 1:
            obs.update(task=d["task"], task_onehot=np.eye(len(self.env_names), dtype=np.float32)[d["task"]])
        if transitions:
            kwargs.update(reward=d["reward"], terminal=d["success"])
        return (
            SequenceDataset(
                obs,
                d["action"],
                ends,
                episode_mask=train_mask,
                stats_mask=eligible if c.normalizer_episodes == "all" else None,
                **kwargs,
            ),
            SequenceDataset(obs, d["action"], ends, episode_mask=val_mask, **kwargs),
        )

    # -- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(
        self,
        policy: Any,
        *,
        n_obs_steps: int,
        n_action_steps: int,
        n_episodes: int | None = None,
        video_path: str | Path | None = None,
        progress: bool = True,
        **kwargs: Any,
    ) -> MultiTaskEvalResult:
        """``n_episodes`` (default ``task.eval_episodes``) seeds from ``task.eval_seed_start`` for EACH task; the
        video (first episode of the first task) is skipped with a warning when no OpenGL backend works."""
        c = self.config
        n = n_episodes or c.eval_episodes
        if video_path is not None and rendering_error() is not None:
            tqdm.write(f"no rollout video: {rendering_error()}")
            video_path = None
        results = {}
        for task_id, name in enumerate(self.env_names):
            results[name] = evaluate(
                policy,
                env_fn=self.env_fn(task_id),
                n_episodes=n,
                seed_start=c.eval_seed_start,
                n_envs=c.n_envs,
                n_obs_steps=n_obs_steps,
                n_action_steps=n_action_steps,
                video_path=video_path if task_id == 0 else None,
                progress=progress,
                **kwargs,
            )
        return merge_results(results)


def rollout_expert(
    env: MetaWorldEnv, seed: int, action_noise: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One expert episode from ``seed``: per-step arrays state [T, 39], action [T, 4] (executed: expert + noise,
    clipped), reward [T], success [T], and with an image env image [T, S, S, 3] uint8; it ends at the first success
    or when the env truncates."""
    obs, _ = env.reset(seed=seed)
    steps: dict[str, list] = {"state": [], "action": [], "reward": [], "success": [], "image": []}
    while True:
        action = env.expert_action()
        if action_noise > 0:
            action = action + rng.normal(0.0, action_noise, ACTION_DIM).astype(np.float32)
        action = np.clip(action, -1.0, 1.0)
        steps["state"].append(env.state)
        if env.image_size is not None:
            steps["image"].append(np.round(np.moveaxis(obs["image"], 0, -1) * 255.0).astype(np.uint8))
        steps["action"].append(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        steps["reward"].append(reward)
        steps["success"].append(terminated)
        if terminated or truncated:
            break
    episode = {
        "state": np.stack(steps["state"]),
        "action": np.stack(steps["action"]),
        "reward": np.asarray(steps["reward"], np.float32),
        "success": np.asarray(steps["success"], bool),
    }
    if env.image_size is not None:
        episode["image"] = np.stack(steps["image"])
    return episode


def merge_results(results: Mapping[str, EvalResult]) -> MultiTaskEvalResult:
    """One result over every task's episodes, in task order."""
    parts = list(results.values())
    successes = [s for r in parts for s in r.successes]
    max_rewards = [m for r in parts for m in r.max_rewards]
    lengths = [n for r in parts for n in r.lengths]
    return MultiTaskEvalResult(
        score=float(np.mean(max_rewards)),
        success_rate=float(np.mean(successes)),
        mean_length=float(np.mean(lengths)),
        n_episodes=len(successes),
        seeds=[s for r in parts for s in r.seeds],
        max_rewards=max_rewards,
        successes=successes,
        lengths=lengths,
        video_path=next((r.video_path for r in parts if r.video_path), None),
        wall_time_s=float(sum(r.wall_time_s for r in parts)),
        tasks=[name for name, r in results.items() for _ in r.seeds],
        success_per_task={name: r.success_rate for name, r in results.items()},
    )
