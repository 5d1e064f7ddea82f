"""robosuite Lift and Can on the real simulator: scripted experts, absolute pose actions, the evaluation env's
protocol, demonstrations through robomimic HDF5 into training windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

pytest.importorskip("robosuite")

from data.robomimic import read_robomimic  # noqa: E402
from envs.robosuite import (  # noqa: E402
    ACTION_DIM,
    RobosuiteEnv,
    rollout_expert,
    shape_meta,
    to_env_action,
    to_policy_action,
)
from envs.tasks import TaskConfig, make_task  # noqa: E402


@pytest.fixture(scope="module")
def lift_env():
    env = RobosuiteEnv("lift")
    yield env
    env.close()


def test_rotation_6d_round_trip_near_the_axis_angle_flip():
    # A top-down gripper is a rotation by ~pi: axis-angle vectors jump sign there, rotation-6d does not.
    rotvecs = np.array([[np.pi - 1e-3, 0, 0], [-(np.pi - 1e-3), 0, 0], [0.3, -2.0, 0.5], [0, 0, 0]])
    actions = np.concatenate([np.ones((4, 3)), rotvecs, [[-1], [1], [1], [-1]]], axis=1)
    policy_actions = to_policy_action(actions)
    assert policy_actions.shape == (4, ACTION_DIM)
    assert np.abs(policy_actions[0, 3:9] - policy_actions[1, 3:9]).max() < 3e-3  # same rotation, nearly equal 6-D
    back = to_env_action(policy_actions)
    np.testing.assert_allclose(back[:, [0, 1, 2, 6]], actions[:, [0, 1, 2, 6]], atol=1e-6)
    angle = (Rotation.from_rotvec(back[:, 3:6]).inv() * Rotation.from_rotvec(rotvecs)).magnitude()
    np.testing.assert_allclose(angle, 0, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected policy actions \[\.\.\., 10\], got shape \(7,\)"):
        to_env_action(np.zeros(7))


def test_reset_is_deterministic_per_seed(lift_env):
    a, _ = lift_env.reset(seed=3)
    b, _ = lift_env.reset(seed=4)
    c, _ = lift_env.reset(seed=3)
    assert {k: list(v.shape) for k, v in a.items()} == shape_meta("lift")["obs"]
    assert all(v.dtype == np.float32 for v in a.values())
    for k in a:
        np.testing.assert_array_equal(a[k], c[k])
    assert not np.allclose(a["object"][:3], b["object"][:3])  # the cube is placed from the seed


def test_controller_tracks_absolute_pose_actions(lift_env):
    obs, _ = lift_env.reset(seed=0)
    site = lift_env.env.robots[0].eef_site_id["right"]
    start = lift_env.env.sim.data.site_xmat[site].reshape(3, 3)
    goal_rot = Rotation.from_euler("z", 0.3) * Rotation.from_matrix(start)
    goal_pos = obs["robot0_eef_pos"] + np.array([0.05, -0.04, -0.06])
    action = np.concatenate([goal_pos, goal_rot.as_rotvec(), [-1.0]])
    for _ in range(40):  # 2 s at 20 Hz, the same absolute command every step
        obs, reward, terminated, truncated, _ = lift_env.step(to_policy_action(action))
    assert np.linalg.norm(obs["robot0_eef_pos"] - goal_pos) < 0.005
    reached = Rotation.from_matrix(lift_env.env.sim.data.site_xmat[site].reshape(3, 3))
    assert (reached.inv() * goal_rot).magnitude() < 0.02
    assert (reward, terminated, truncated) == (0.0, False, False)


@pytest.mark.parametrize("task", ["lift", "can"])
def test_scripted_expert_succeeds_and_success_terminates(task, lift_env):
    env = lift_env if task == "lift" else RobosuiteEnv("can")
    for seed in (0, 1) if task == "lift" else (0,):
        episode, success = rollout_expert(env, seed)
        n = len(episode["action"])
        assert success and 20 < n < (80 if task == "lift" else 250), (seed, n)
        assert episode["reward"].tolist() == [0.0] * (n - 1) + [1.0]  # reward 1 exactly at success, which ends it
        assert episode["done"][-1] == 1.0 and episode["state"].shape[0] == n
        assert {k: list(episode[k].shape[1:]) for k in shape_meta(task)["obs"]} == shape_meta(task)["obs"]
        assert episode["action"].shape == (n, 7) and set(episode["action"][:, 6]) <= {-1.0, 1.0}


class _Replay:
    """A chunk policy that replays recorded 10-D actions open loop (n_obs_steps 1: chunk[0] is executed first)."""

    def __init__(self, actions: np.ndarray, chunk: int) -> None:
        self.actions, self.chunk, self.calls = torch.as_tensor(actions), chunk, 0

    def predict_action_chunk(self, obs, noise=None):
        idx = torch.arange(self.calls * self.chunk, (self.calls + 1) * self.chunk).clamp(max=len(self.actions) - 1)
        self.calls += 1
        return self.actions[idx][None].repeat(len(obs["object"]), 1, 1)


def test_generate_import_train_windows_and_evaluate(tmp_path):
    path = tmp_path / "lift.hdf5"
    task = make_task(TaskConfig(name="robosuite/lift", dataset_path=str(path), val_ratio=0.5, max_steps=400))
    with pytest.raises(FileNotFoundError, match="robodiff data generate task=robosuite/lift"):
        task.datasets(16, 2, 8)
    info = task.generate(2, path, seed=7, progress=False)
    assert info["n_episodes"] == 2 and info["seeds"] == [7, 8] and info["failed_seeds"] == []

    buf = read_robomimic(path, filter_key="train")
    assert buf.n_episodes == 1 and buf.data["action"].shape[1] == 7
    train, val = task.datasets(16, 2, 8)
    batch = train.get_batch(torch.arange(len(train)))
    assert {k: list(v.shape[1:]) for k, v in batch["obs"].items()} == {
        k: [2, *s] for k, s in shape_meta("lift")["obs"].items()
    }
    # Diffusion Policy's padding: an episode of length L gives L - H + (To - 1) + (Ta - 1) + 1 = L - 7 windows.
    assert batch["action"].shape[1:] == (16, ACTION_DIM) and len(train) + len(val) == info["n_steps"] - 2 * 7
    np.testing.assert_allclose(
        to_env_action(batch["action"][0].numpy())[:, [0, 1, 2, 6]],
        buf.data["action"][np.clip(np.arange(-1, 15), 0, None)][:, [0, 1, 2, 6]],
        atol=1e-6,
    )  # first window: one step of front padding

    # Replaying seed 7's recorded actions through envs.evaluate on seed 7 succeeds (deterministic reset, the
    # absolute actions survive the rotation-6d round trip, success = terminated); on seed 8 the same actions fail.
    demo = read_robomimic(path).get_episode(0)
    actions = to_policy_action(demo["action"])
    replay = make_task(TaskConfig(name="robosuite/lift", eval_seed_start=7, max_steps=400)).evaluate(
        _Replay(actions, 8), n_obs_steps=1, n_action_steps=8, n_episodes=1, progress=False
    )
    assert replay.successes == [True] and replay.lengths == [len(actions)] and replay.max_rewards == [1.0]
    # Holding the first pose never lifts the cube: truncated at max_steps, reward 0, no success.
    hold = make_task(TaskConfig(name="robosuite/lift", eval_seed_start=7, max_steps=10)).evaluate(
        _Replay(actions[:1], 8), n_obs_steps=1, n_action_steps=8, n_episodes=1, progress=False
    )
    assert hold.successes == [False] and hold.lengths == [10] and hold.max_rewards == [0.0]
