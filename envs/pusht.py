"""Push-T simulation following Diffusion Policy's (Chi et al. 2023) evaluation protocol.

Wraps gym-pusht's physics by composition and changes what the protocol needs:
- initial states come from `np.random.RandomState(seed)` exactly as in Diffusion Policy's original
  PushTEnv, so seeds 100000..100049 give the published test set (gym-pusht uses its own generator);
- `reset_to_state` can set the block angle before its position (`legacy=False`), which is what reproduces the
  recorded demonstration states (gym-pusht only does the legacy order: position, then angle);
- observations match the training data: 9 block keypoints + agent position (state), or a 96x96 render (image).

This module must not import torch: it runs inside vector-env worker processes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import gymnasium as gym
import numpy as np
import shapely
from gym_pusht.envs.pusht import PushTEnv as _GymPushTEnv
from gymnasium import spaces
from pymunk import Vec2d

# Block-frame coordinates (pixels) of the 9 keypoints stored in the demonstrations (`data/keypoint`).
# Recovered from pusht_cchi_v7_replay.zarr as the mean over all frames of R(-theta) (keypoint - block_xy);
# per-point std 0.03 px. tests/test_pusht_env.py recomputes them from the data.
BLOCK_KEYPOINTS_LOCAL = np.array(
    [
        [9.268611, 90.022804],
        [-60.992165, -1.1871753],
        [60.907116, -1.3928658],
        [-0.27046284, 25.543589],
        [-14.063669, 122.81129],
        [39.000347, 32.860786],
        [-39.954643, 32.734173],
        [-16.821692, 62.872383],
        [23.54105, -1.7001413],
    ],
    dtype=np.float64,
)
SUCCESS_COVERAGE = 0.95  # Diffusion Policy: the episode ends and counts as a success above 95% goal coverage
WORKSPACE = 512.0  # side of the square workspace, pixels
# "state_image": both observations at once, for a test-time composition of state and image policies
OBS_MODES = ("state", "image", "state_image")
OBS_KEYS = {"state": ("state",), "image": ("agent_pos", "image"), "state_image": ("agent_pos", "image", "state")}


def obs_mode_for(keys: Iterable[str]) -> str:
    """The observation mode that provides exactly ``keys`` (e.g. a composition's union of its parents' keys)."""
    wanted = tuple(sorted(keys))
    for mode, provided in OBS_KEYS.items():
        if wanted == provided:
            return mode
    raise ValueError(f"no Push-T observation mode provides exactly the keys {list(wanted)}; modes: {OBS_KEYS}")


def block_keypoints(state: np.ndarray) -> np.ndarray:
    """Block keypoints in world pixels: `state [..., 5] (agent xy, block xy, angle) -> [..., 9, 2]`."""
    state = np.asarray(state, dtype=np.float64)
    if state.shape[-1:] != (5,):
        raise ValueError(f"state must have shape [..., 5], got {state.shape}")
    theta = state[..., 4, None]  # [..., 1], broadcasts over the 9 points
    cos, sin = np.cos(theta), np.sin(theta)
    px, py = BLOCK_KEYPOINTS_LOCAL[:, 0], BLOCK_KEYPOINTS_LOCAL[:, 1]
    x = cos * px - sin * py + state[..., 2, None]
    y = sin * px + cos * py + state[..., 3, None]
    return np.stack([x, y], axis=-1)


# The T as gym-pusht builds it (`add_tee`, scale 30, length 4): two rectangles in the block frame, pixels.
_TEE_LOCAL = np.array(
    [
        [[-60.0, 30.0], [60.0, 30.0], [60.0, 0.0], [-60.0, 0.0]],  # the bar
        [[-15.0, 30.0], [-15.0, 120.0], [15.0, 120.0], [15.0, 30.0]],  # the stem
    ]
)
GOAL_POSE = np.array([256.0, 256.0, np.pi / 4])  # gym-pusht's fixed goal: block x, y, angle


def _tee_polygons(pose: np.ndarray) -> np.ndarray:
    """``pose [N, 3] (x, y, angle) -> shapely polygons [N, 2]`` (bar, stem) in world pixels."""
    cos, sin = np.cos(pose[:, 2, None, None]), np.sin(pose[:, 2, None, None])  # [N, 1, 1]
    x = cos * _TEE_LOCAL[..., 0] - sin * _TEE_LOCAL[..., 1] + pose[:, 0, None, None]  # [N, 2, 4]
    y = sin * _TEE_LOCAL[..., 0] + cos * _TEE_LOCAL[..., 1] + pose[:, 1, None, None]
    return shapely.polygons(np.stack([x, y], axis=-1))


def coverage(state: np.ndarray) -> np.ndarray:
    """Goal coverage as gym-pusht computes it (area(block & goal) / area(goal)) for ``state [..., 5]`` (agent xy,
    block xy, angle) -> ``[...]``, vectorised over states: offline RL computes the reward of every recorded step.

    The bar and stem of a T only share an edge, so the intersection area of the two Ts is the sum of the four
    pairwise rectangle intersections (no shapely union per state)."""
    state = np.asarray(state, dtype=np.float64)
    if state.shape[-1:] != (5,):
        raise ValueError(f"state must have shape [..., 5], got {state.shape}")
    flat = state.reshape(-1, 5)
    block = _tee_polygons(flat[:, 2:])  # [N, 2]
    goal = _tee_polygons(GOAL_POSE[None])[0]  # [2]
    inter = shapely.area(shapely.intersection(block[:, :, None], goal[None, None, :])).sum(axis=(1, 2))
    return (inter / shapely.area(goal).sum()).reshape(state.shape[:-1])


def reward_from_coverage(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The environment's reward and termination: ``(clip(coverage / 0.95, 0, 1), coverage > 0.95)``."""
    return np.clip(cov / SUCCESS_COVERAGE, 0.0, 1.0), cov > SUCCESS_COVERAGE


def initial_state(seed: int | None) -> np.ndarray:
    """Diffusion Policy's initial state for `seed`: [agent x, agent y, block x, block y, block angle]."""
    rs = np.random.RandomState(seed)
    # Same calls in the same order as diffusion_policy/env/pusht/pusht_env.py, so the test seeds match.
    return np.array(
        [
            rs.randint(50, 450),
            rs.randint(50, 450),
            rs.randint(100, 400),
            rs.randint(100, 400),
            rs.randn() * 2 * np.pi - np.pi,
        ]
    )


class PushTEnv(gym.Env):
    """Push-T at 10 Hz. Action: target agent position [2] in pixels. Observations are float32:

    - obs_mode="state": {"state": [20]} = 9 block keypoints flattened (x0, y0, x1, y1, ...) then agent x, y;
    - obs_mode="image": {"image": [3, render_size, render_size] in [0, 1], "agent_pos": [2]};
    - obs_mode="state_image": both dicts' keys.

    reward = clip(coverage / 0.95, 0, 1); terminated when coverage > 0.95; truncated after `max_steps` steps.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self, obs_mode: str = "state", max_steps: int = 300, render_size: int = 96, video_size: int = 256
    ) -> None:
        super().__init__()
        if obs_mode not in OBS_MODES:
            raise ValueError(f"obs_mode must be one of {OBS_MODES}, got {obs_mode!r}")
        for name, value in (
            ("max_steps", max_steps),
            ("render_size", render_size),
            ("video_size", video_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.obs_mode = obs_mode
        self.max_steps = max_steps
        self.render_mode = "rgb_array"
        self._inner = _GymPushTEnv(
            obs_type="state",  # the inner observation is ignored; ours is built in _get_obs
            render_mode="rgb_array",
            observation_width=render_size,
            observation_height=render_size,
            visualization_width=video_size,
            visualization_height=video_size,
        )
        pos = spaces.Box(0.0, WORKSPACE, shape=(2,), dtype=np.float32)
        state = spaces.Box(0.0, WORKSPACE, shape=(2 * len(BLOCK_KEYPOINTS_LOCAL) + 2,), dtype=np.float32)
        image = spaces.Box(0.0, 1.0, shape=(3, render_size, render_size), dtype=np.float32)
        boxes = {"state": state, "image": image, "agent_pos": pos}
        self.observation_space = spaces.Dict({k: boxes[k] for k in OBS_KEYS[obs_mode]})
        self.action_space = spaces.Box(0.0, WORKSPACE, shape=(2,), dtype=np.float32)
        self._n_steps = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Reset to Diffusion Policy's seeded initial state, or to `options["reset_to_state"]` (shape [5]).

        `options["legacy"]` (default True) sets the block position before its angle, as the original env
        does for seeded test resets; legacy=False sets the angle first, which reproduces the recorded
        demonstration states.
        """
        super().reset(seed=seed)
        options = options or {}
        if options.get("reset_to_state") is not None:
            state = np.asarray(options["reset_to_state"], dtype=np.float64)
            if state.shape != (5,) or not np.all(np.isfinite(state)):
                raise ValueError(f"reset_to_state must be 5 finite numbers, got {options['reset_to_state']!r}")
        else:
            # Without a seed, continue the generator gymnasium seeded earlier so a sequence of resets is
            # reproducible from the first seed.
            state = initial_state(seed if seed is not None else int(self.np_random.integers(2**31)))
        self._inner._setup()
        self._set_state(state, legacy=bool(options.get("legacy", True)))
        self._inner._last_action = None
        self._n_steps = 0
        return self._get_obs(), {"coverage": self._inner._get_coverage(), "is_success": False}

    def _set_state(self, state: np.ndarray, legacy: bool) -> None:
        agent, block = self._inner.agent, self._inner.block
        agent.position = state[:2].tolist()
        # pymunk rotates a body about its centre of gravity, which for the T is not the body origin, so
        # setting the angle after the position moves the origin by (I - R(angle)) @ cog. The demonstrations
        # were recorded with the angle set first.
        if legacy:
            block.position = state[2:4].tolist()
            block.angle = float(state[4])
        else:
            block.angle = float(state[4])
            block.position = state[2:4].tolist()
        self._inner.space.step(self._inner.dt)  # as the original: one physics step so the state takes effect

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,):
            raise ValueError(f"action must have shape (2,) (target agent x, y), got shape {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite (target agent x, y in pixels), got {action.tolist()}")
        _, _, _, _, inner_info = self._inner.step(action)  # 10 PD-controlled physics steps of 0.01 s
        self._n_steps += 1
        coverage = float(inner_info["coverage"])
        reward, terminated = (x.item() for x in reward_from_coverage(np.asarray(coverage)))
        truncated = self._n_steps >= self.max_steps
        return (
            self._get_obs(),
            reward,
            terminated,
            truncated,
            {"coverage": coverage, "is_success": terminated},
        )

    @property
    def physics_dt(self) -> float:
        """gym-pusht's physics sub-step (0.01 s): `step` runs 10 of them per 10 Hz action."""
        return float(self._inner.dt)

    def physics_step(self, action: np.ndarray, dt: float | None = None) -> None:
        """One PD-controlled physics sub-step toward the target `action [2]` (pixels), for real-time simulation
        (deploy/sim_pusht.py) where targets change between sub-steps. With the default `dt` (`physics_dt`), ten of
        these with the same target are exactly one `step` (same operations as gym-pusht's step loop, k_p 100,
        k_v 20); no step counting, reward or observation."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be 2 finite numbers (target agent x, y), got {action.tolist()}")
        dt = self.physics_dt if dt is None else dt
        inner = self._inner
        inner._last_action = action  # the target marker `render` draws
        acceleration = inner.k_p * (action - inner.agent.position) + inner.k_v * (Vec2d(0, 0) - inner.agent.velocity)
        inner.agent.velocity += acceleration * dt
        inner.space.step(dt)

    def observation(self) -> dict[str, np.ndarray]:
        """The current observation, as `reset`/`step` return it."""
        return self._get_obs()

    def get_state(self) -> np.ndarray:
        """Current [agent x, agent y, block x, block y, block angle (unwrapped)] as float64."""
        agent, block = self._inner.agent, self._inner.block
        return np.array([*agent.position, *block.position, block.angle], dtype=np.float64)

    def _get_obs(self) -> dict[str, np.ndarray]:
        agent_pos = np.asarray(self._inner.agent.position, dtype=np.float32)
        obs = {}
        if "state" in OBS_KEYS[self.obs_mode]:
            keypoints = block_keypoints(self.get_state()).reshape(-1)
            obs["state"] = np.concatenate([keypoints, agent_pos]).astype(np.float32)
        if "image" in OBS_KEYS[self.obs_mode]:
            image = self._inner._render(visualize=False)  # [H, W, 3] uint8, no action marker
            obs.update(image=np.moveaxis(image, -1, 0).astype(np.float32) / 255.0, agent_pos=agent_pos)
        return obs

    def render(self) -> np.ndarray:
        """RGB uint8 frame [video_size, video_size, 3] with the last action marked, for videos."""
        return self._inner._render(visualize=True)

    def close(self) -> None:
        self._inner.close()
