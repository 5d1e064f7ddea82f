"""robosuite Lift and Can (the robomimic tasks): environment wrapper, scripted experts, demonstration generation in
robomimic's HDF5 layout and the task (``robosuite/lift``, ``robosuite/can``) that trains and evaluates on them.

Simulator settings follow robomimic's: Panda robot, 20 Hz control, at most 400 steps per episode, success from the
environment's own ``_check_success()`` (Lift: cube 4 cm above the table; Can: can inside its target bin region with the
gripper at least ~7 cm away from it). The arm runs robosuite 1.5's ``OSC_POSE`` controller with
``input_type: absolute`` and ``input_ref_frame: world`` (``robosuite/controllers/parts/arm/osc.py``: the goal is
``action[0:3]`` as a world position and ``Rotation.from_rotvec(action[3:6])`` as a world orientation of the gripper's
grip site), the absolute end-effector actions that Diffusion Policy trains on for robomimic (Chi et al. 2023,
``abs_action: true``).

Actions. Stored in HDF5 as robomimic's absolute 7-D format ``[eef pos 3, axis-angle 3, gripper 1]``
(gripper -1 open, +1 closed). The policy sees 10-D ``[pos 3, rotation-6d 6, gripper 1]``: a top-down gripper sits
near a 180-degree rotation where the axis-angle vector jumps between ``+pi`` and ``-pi`` axes, so Diffusion Policy
converts axis-angle to the continuous 6-D representation (Zhou et al. 2019, first two columns of the rotation
matrix) before training; the env converts it back.

Observations (robomimic's low-dimensional keys): ``object`` (Lift: cube pos, quat, gripper-to-cube pos = 10; Can: can
pos, quat, can-to-eef pos and quat = 14), ``robot0_eef_pos`` [3], ``robot0_eef_quat`` [4] (xyzw),
``robot0_gripper_qpos`` [2]. No images: MuJoCo has no offscreen GL backend on the development machine.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from scipy.spatial.transform import Rotation

from data.replay_buffer import ReplayBuffer
from data.robomimic import read_robomimic, write_robomimic
from data.sequence import SequenceDataset, split_episodes
from envs.tasks import dataset_path

ENV_NAMES = {"lift": "Lift", "can": "PickPlaceCan"}  # task -> robosuite environment class
OBJECT_DIMS = {"lift": 10, "can": 14}
OBS_KEYS = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
CONTROL_FREQ = 20  # Hz, robomimic's
MAX_STEPS = 400  # robomimic's rollout horizon for Lift and Can
ACTION_DIM = 10  # pos 3 + rotation-6d 6 + gripper 1
GRIPPER_OPEN, GRIPPER_CLOSED = -1.0, 1.0


def shape_meta(task: str) -> dict:
    _check_task(task)
    obs = {"object": [OBJECT_DIMS[task]], "robot0_eef_pos": [3], "robot0_eef_quat": [4], "robot0_gripper_qpos": [2]}
    return {"obs": obs, "action": [ACTION_DIM]}


def _check_task(task: str) -> None:
    if task not in ENV_NAMES:
        raise ValueError(f"robosuite task must be one of {sorted(ENV_NAMES)}, got {task!r}")


# -- actions: robomimic's axis-angle <-> the policy's rotation-6d ------------------------------------------------------
def to_policy_action(action: np.ndarray) -> np.ndarray:
    """``[..., 7]`` (pos, axis-angle, gripper) -> ``[..., 10]`` (pos, rotation-6d, gripper)."""
    action = np.asarray(action)
    if action.shape[-1] != 7:
        raise ValueError(f"expected robomimic absolute actions [..., 7], got shape {action.shape}")
    mat = Rotation.from_rotvec(action[..., 3:6].reshape(-1, 3)).as_matrix()  # [M, 3, 3]
    rot6d = mat[:, :, :2].transpose(0, 2, 1).reshape(*action.shape[:-1], 6)  # columns x, y
    return np.concatenate([action[..., :3], rot6d, action[..., 6:]], axis=-1).astype(np.float32)


def to_env_action(action: np.ndarray) -> np.ndarray:
    """``[..., 10]`` -> ``[..., 7]``; the 6-D part is orthonormalised by Gram-Schmidt (Zhou et al. 2019)."""
    action = np.asarray(action, dtype=np.float64)
    if action.shape[-1] != ACTION_DIM:
        raise ValueError(f"expected policy actions [..., {ACTION_DIM}], got shape {action.shape}")
    a, b = action[..., 3:6], action[..., 6:9]
    x = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
    b = b - np.sum(x * b, axis=-1, keepdims=True) * x
    y = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-8)
    mat = np.stack([x, y, np.cross(x, y)], axis=-1)  # columns
    rotvec = Rotation.from_matrix(mat.reshape(-1, 3, 3)).as_rotvec().reshape(*action.shape[:-1], 3)
    return np.concatenate([action[..., :3], rotvec, action[..., 9:]], axis=-1)


# -- the simulator ----------------------------------------------------------------------------------------------------
def env_kwargs(task: str) -> dict[str, Any]:
    """Keyword arguments of ``robosuite.make`` (also stored as robomimic's ``env_args`` in generated files)."""
    _check_task(task)
    arm = {
        "type": "OSC_POSE",
        "input_max": 1,
        "input_min": -1,
        "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5],
        "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5],
        "kp": 150,
        "damping_ratio": 1,
        "impedance_mode": "fixed",
        "kp_limits": [0, 300],
        "damping_ratio_limits": [0, 10],
        "position_limits": None,
        "orientation_limits": None,
        "uncouple_pos_ori": True,
        "input_type": "absolute",  # robosuite's default Panda config says "delta"; Diffusion Policy uses absolute
        "input_ref_frame": "world",
        "interpolation": None,
        "ramp_ratio": 0.2,
        "gripper": {"type": "GRIP"},
    }
    return {
        "robots": "Panda",
        "controller_configs": {"type": "BASIC", "body_parts": {"right": arm}},
        "has_renderer": False,
        "has_offscreen_renderer": False,
        "use_camera_obs": False,
        "use_object_obs": True,
        "reward_shaping": False,
        "control_freq": CONTROL_FREQ,
        "horizon": MAX_STEPS,
        "ignore_done": True,  # episode ends are this wrapper's business (success or max_steps)
        "hard_reset": False,  # a hard reset reloads the MJCF model every episode (~1 s)
    }


def make_raw_env(task: str) -> Any:
    import robosuite  # imported here: robosuite loads MuJoCo models and numba at import

    return robosuite.make(ENV_NAMES[task], **env_kwargs(task))


def _obs(raw: dict[str, np.ndarray], task: str) -> dict[str, np.ndarray]:
    obs = {k: np.asarray(raw[k], np.float32) for k in OBS_KEYS if k != "object"}
    obs["object"] = np.asarray(raw["object-state"], np.float32)
    if obs["object"].shape != (OBJECT_DIMS[task],):
        raise ValueError(f"{task}: object-state has shape {obs['object'].shape}, expected ({OBJECT_DIMS[task]},)")
    return obs


class RobosuiteEnv(gym.Env):
    """Gymnasium view of a robosuite task for ``envs.evaluate``: 10-D absolute actions, dict observations of
    ``OBS_KEYS``; reward 1.0 on success else 0.0; terminated = success (``_check_success()``); truncated after
    ``max_steps``. ``reset(seed=s)`` draws the initial state from ``s`` alone."""

    metadata = {"render_modes": []}

    def __init__(self, task: str, max_steps: int = MAX_STEPS) -> None:
        _check_task(task)
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.task, self.max_steps = task, max_steps
        self.env = make_raw_env(task)
        meta = shape_meta(task)
        self.observation_space = gym.spaces.Dict(
            {k: gym.spaces.Box(-np.inf, np.inf, tuple(s), np.float32) for k, s in meta["obs"].items()}
        )
        self.action_space = gym.spaces.Box(-np.inf, np.inf, (ACTION_DIM,), np.float32)
        self.steps = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        # robosuite draws object placement and robot initial-joint noise from NumPy's global generator
        # (utils/placement_samplers.py, robots/robot.py); seed it for this reset only and restore it afterwards.
        saved = np.random.get_state()
        np.random.seed(seed if seed is not None else self.np_random.integers(2**31))
        try:
            raw = self.env.reset()
        finally:
            np.random.set_state(saved)
        self.steps = 0
        return _obs(raw, self.task), {}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        return self.step_raw(to_env_action(action))

    def step_raw(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        """Step with a robomimic 7-D absolute action (the scripted experts act in this form)."""
        raw, _, _, _ = self.env.step(np.asarray(action, np.float64))
        self.steps += 1
        success = bool(self.env._check_success())
        return _obs(raw, self.task), float(success), success, self.steps >= self.max_steps, {"success": success}

    def sim_state(self) -> np.ndarray:
        """Flattened MuJoCo state (time, qpos, qvel), robomimic's ``states`` entry."""
        return np.asarray(self.env.sim.get_state().flatten())

    def close(self) -> None:
        self.env.close()


# -- scripted experts -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Waypoint:
    pos: np.ndarray  # [3] world position of the grip site
    gripper: float
    min_steps: int = 0  # hold at least this many steps (gripper closing/opening)
    tol: float = 0.01  # metres between the grip site and pos before moving on


class ScriptedExpert:
    """Waypoint expert with privileged object pose: above the object, down, close the gripper, lift; for Can also
    carry above the target bin, lower, open and move up. The commanded pose moves at most ``max_speed`` metres and
    ``max_turn`` radians per step towards the current waypoint, so demonstrations are smooth absolute trajectories
    that the OSC controller tracks. The gripper is kept pointing down; for Lift its yaw is turned to the cube's
    (modulo 90 degrees, the cube's symmetry)."""

    def __init__(self, task: str, max_speed: float = 0.012, max_turn: float = 0.12) -> None:
        _check_task(task)
        self.task, self.max_speed, self.max_turn = task, max_speed, max_turn

    def reset(self, env: RobosuiteEnv) -> None:
        raw = env.env
        self.site = raw.robots[0].eef_site_id["right"]
        self.cmd_pos = raw.sim.data.site_xpos[self.site].copy()
        self.rot0 = raw.sim.data.site_xmat[self.site].reshape(3, 3).copy()  # initial (top-down) gripper orientation
        self.yaw, self.target_yaw = 0.0, 0.0
        obj_pos, obj_yaw = self._object_pose(raw)
        if self.task == "lift":
            gripper_yaw = np.arctan2(self.rot0[1, 0], self.rot0[0, 0])
            self.target_yaw = (obj_yaw - gripper_yaw + np.pi / 4) % (np.pi / 2) - np.pi / 4
        grasp = obj_pos + np.array([0.0, 0.0, -0.005 if self.task == "lift" else 0.01])
        plan = [
            _Waypoint(grasp + [0, 0, 0.1], GRIPPER_OPEN),
            _Waypoint(grasp, GRIPPER_OPEN, tol=0.006),
            _Waypoint(grasp, GRIPPER_CLOSED, min_steps=10, tol=np.inf),
        ]
        if self.task == "lift":
            plan.append(_Waypoint(grasp + [0, 0, 0.2], GRIPPER_CLOSED, tol=0.0))  # success ends the episode first
        else:
            target = raw.target_bin_placements[raw.object_id]
            carry_z = raw.bin2_pos[2] + 0.25  # above the bin walls
            plan += [
                # Carrying the can with the arm stretched out, OSC (kp 150) tracks with 1-2 cm of sag: looser tol.
                _Waypoint(np.array([*grasp[:2], carry_z]), GRIPPER_CLOSED, tol=0.04),
                _Waypoint(np.array([*target[:2], carry_z]), GRIPPER_CLOSED, tol=0.04),
                _Waypoint(np.array([*target[:2], target[2] + 0.15]), GRIPPER_CLOSED, tol=0.04),
                _Waypoint(np.array([*target[:2], target[2] + 0.15]), GRIPPER_OPEN, min_steps=8, tol=np.inf),
                _Waypoint(np.array([*target[:2], carry_z]), GRIPPER_OPEN, tol=0.0),
            ]
        self.plan, self.stage, self.held = plan, 0, 0

    def _object_pose(self, raw: Any) -> tuple[np.ndarray, float]:
        body = raw.cube_body_id if self.task == "lift" else raw.obj_body_id[raw.obj_to_use]
        mat = raw.sim.data.body_xmat[body].reshape(3, 3)
        return raw.sim.data.body_xpos[body].copy(), float(np.arctan2(mat[1, 0], mat[0, 0]))

    def act(self, env: RobosuiteEnv) -> np.ndarray:
        """The next 7-D absolute action ``[pos, axis-angle, gripper]``."""
        wp = self.plan[self.stage]
        eef = env.env.sim.data.site_xpos[self.site]
        reached = np.linalg.norm(self.cmd_pos - wp.pos) < 1e-6 and np.linalg.norm(eef - wp.pos) < wp.tol
        if reached and self.held >= wp.min_steps and self.stage + 1 < len(self.plan):
            self.stage, self.held = self.stage + 1, 0
            wp = self.plan[self.stage]
        self.held += 1
        delta = wp.pos - self.cmd_pos
        dist = np.linalg.norm(delta)
        self.cmd_pos = self.cmd_pos + (delta if dist <= self.max_speed else delta * self.max_speed / dist)
        self.yaw += float(np.clip(self.target_yaw - self.yaw, -self.max_turn, self.max_turn))
        rot = Rotation.from_euler("z", self.yaw) * Rotation.from_matrix(self.rot0)
        return np.concatenate([self.cmd_pos, rot.as_rotvec(), [wp.gripper]])


def rollout_expert(
    env: RobosuiteEnv, seed: int, action_noise: float = 0.0, rng: np.random.Generator | None = None
) -> tuple[dict[str, np.ndarray], bool]:
    """One scripted episode: ``({obs keys, action [T, 7], reward [T], done [T], state [T, S]}, success)``.

    ``action_noise``: std (metres) of Gaussian noise on the commanded position; the noisy action is the one executed
    and recorded (mixed-quality data), drawn from ``rng`` (default: seeded by ``seed``)."""
    rng = rng if rng is not None else np.random.default_rng(seed)
    expert = ScriptedExpert(env.task)
    obs, _ = env.reset(seed=seed)
    expert.reset(env)
    steps: dict[str, list] = {k: [] for k in (*OBS_KEYS, "action", "reward", "done", "state")}
    success = False
    for _ in range(env.max_steps):
        action = expert.act(env)
        if action_noise > 0:
            action[:3] += rng.normal(0.0, action_noise, 3)
        for k in OBS_KEYS:
            steps[k].append(obs[k])
        steps["state"].append(env.sim_state())
        obs, reward, success, truncated, _ = env.step_raw(action)
        steps["action"].append(action)
        steps["reward"].append(reward)
        steps["done"].append(float(success))
        if success or truncated:
            break
    episode = {k: np.asarray(v, np.float64 if k in ("action", "state") else np.float32) for k, v in steps.items()}
    return episode, success


# -- the task ---------------------------------------------------------------------------------------------------------
class RobosuiteTask:
    """``robosuite/lift`` and ``robosuite/can``: Diffusion Policy on scripted demonstrations (robomimic HDF5),
    evaluated with robomimic's success definition over ``config.eval_episodes`` seeds from ``eval_seed_start``."""

    def __init__(self, config: Any, task: str) -> None:
        _check_task(task)
        self.config, self.task = config, task
        self.shape_meta = shape_meta(task)

    @property
    def dataset_path(self) -> Path:
        return dataset_path(self.config, "robosuite", f"{self.task}.hdf5")

    def load(self) -> ReplayBuffer:
        path = self.dataset_path
        if not path.exists():
            raise FileNotFoundError(
                f"no robosuite/{self.task} demonstrations at {path}; generate them with `robodiff data generate "
                f"task=robosuite/{self.task} n_episodes=200` or pass task.dataset_path=<file.hdf5>"
            )
        return read_robomimic(path, obs_keys=OBS_KEYS)

    def datasets(
        self, horizon: int, n_obs_steps: int, n_action_steps: int, transitions: bool = False
    ) -> tuple[SequenceDataset, SequenceDataset]:
        buf = self.load()
        c = self.config
        train_mask, val_mask = split_episodes(
            buf.n_episodes, c.val_ratio, c.split_seed, c.max_train_episodes, c.train_range
        )
        stats = np.ones(buf.n_episodes, bool) if c.normalizer_episodes == "all" else None
        obs = {k: buf.data[k].astype(np.float32) for k in OBS_KEYS}
        kwargs: dict[str, Any] = dict(horizon=horizon, n_obs_steps=n_obs_steps, n_action_steps=n_action_steps)
        if transitions:  # the environment's reward: 1 on the step that reaches success, which ends the episode
            kwargs.update(reward=buf.data["reward"], terminal=buf.data["done"])
        action = to_policy_action(buf.data["action"])
        train = SequenceDataset(obs, action, buf.episode_ends, episode_mask=train_mask, stats_mask=stats, **kwargs)
        val = SequenceDataset(obs, action, buf.episode_ends, episode_mask=val_mask, **kwargs)
        return train, val

    def env_fn(self) -> _EnvFactory:
        return _EnvFactory(self.task, self.config.max_steps)

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
    ) -> Any:
        from envs.evaluate import evaluate

        if video_path is not None:
            warnings.warn(
                "robosuite tasks record no video (no offscreen rendering here); video_path ignored", stacklevel=2
            )
        c = self.config
        return evaluate(
            policy,
            env_fn=self.env_fn(),
            n_episodes=n_episodes or c.eval_episodes,
            seed_start=c.eval_seed_start,
            n_envs=c.n_envs,
            n_obs_steps=n_obs_steps,
            n_action_steps=n_action_steps,
            progress=progress,
            **kwargs,
        )

    def generate(
        self,
        n_episodes: int,
        out: str | Path | None = None,
        seed: int = 0,
        action_noise: float = 0.0,
        progress: bool = True,
    ) -> dict:
        """Roll out the scripted expert on seeds ``seed, seed + 1, ...`` until ``n_episodes`` demonstrations
        succeed (failed rollouts are dropped and counted; more than ``n_episodes`` failures is an error), then write
        them atomically as robomimic HDF5 with ``mask/train`` and ``mask/valid`` from the task's split settings."""
        from tqdm import tqdm

        if n_episodes < 1:
            raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
        if action_noise < 0:
            raise ValueError(f"action_noise must be >= 0, got {action_noise}")
        out = Path(out) if out is not None else self.dataset_path
        env = RobosuiteEnv(self.task, self.config.max_steps)
        rng = np.random.default_rng(seed)
        buf, failed, seeds = ReplayBuffer(), [], []
        start = time.perf_counter()
        bar = tqdm(total=n_episodes, desc=f"generate robosuite/{self.task}", unit="episode", disable=not progress)
        try:
            s = seed
            while buf.n_episodes < n_episodes:
                if len(failed) > n_episodes:
                    raise ValueError(
                        f"the scripted expert failed {len(failed)} of {len(failed) + buf.n_episodes} episodes "
                        f"(seeds {failed[:10]}...); action_noise={action_noise} is probably too large"
                    )
                episode, success = rollout_expert(env, s, action_noise, rng)
                if success and len(episode["action"]) >= 2:
                    buf.add_episode(episode)
                    seeds.append(s)
                    bar.update(1)
                else:
                    failed.append(s)
                s += 1
        finally:
            bar.close()
            env.close()
        train, val = split_episodes(n_episodes, self.config.val_ratio, self.config.split_seed)
        env_args = {"env_name": ENV_NAMES[self.task], "type": 1, "env_kwargs": env_kwargs(self.task)}  # 1: robosuite
        write_robomimic(
            buf,
            out,
            env_args=env_args,
            masks={"train": np.flatnonzero(train).tolist(), "valid": np.flatnonzero(val).tolist()},
        )
        lengths = buf.episode_lengths
        return {
            "path": str(out),
            "task": f"robosuite/{self.task}",
            "n_episodes": buf.n_episodes,
            "n_steps": buf.n_steps,
            "episode_length": {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max())},
            "seeds": seeds,
            "failed_seeds": failed,
            "action_noise": action_noise,
            "wall_time_s": time.perf_counter() - start,
        }


@dataclasses.dataclass(frozen=True)
class _EnvFactory:
    """Picklable zero-argument env factory for ``envs.evaluate`` worker processes."""

    task: str
    max_steps: int

    def __call__(self) -> RobosuiteEnv:
        return RobosuiteEnv(self.task, self.max_steps)
