"""MetaWorld v3 tasks (envs/metaworld.py) on the real simulator: expert data, eval-env rules, datasets, evaluate."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("metaworld", reason="MetaWorld is an optional simulator (pip install -e .[sims])")

from data.replay_buffer import ReplayBuffer  # noqa: E402
from envs.metaworld import (  # noqa: E402
    MT10_TASKS,
    MetaWorldEnv,
    MetaWorldTask,
    rendering_error,
    rollout_expert,
)
from envs.tasks import METAWORLD_TASKS, TaskConfig, make_task, task_names  # noqa: E402

# a tiny Diffusion Policy and a two-step run, for the CLI smoke tests
TINY_DP = [
    "policy=diffusion_unet",
    "policy.down_dims=[16,32]",
    "policy.diffusion_step_embed_dim=16",
    "policy.horizon=8",
    "policy.n_action_steps=4",
]
TWO_STEPS = ["train.steps=2", "train.warmup_steps=1", "train.val_every=0", "train.num_threads=1"]


def reach_task(tmp_path, **kwargs) -> MetaWorldTask:
    return make_task(TaskConfig(name="metaworld/reach-v3", dataset_path=str(tmp_path / "reach.zarr"), **kwargs))


@pytest.fixture(scope="module")
def reach_data(tmp_path_factory) -> tuple[MetaWorldTask, dict]:
    tmp = tmp_path_factory.mktemp("mw")
    task = reach_task(tmp, val_ratio=0.25)
    return task, task.generate(4, progress=False)


class GoalReacher:
    """Scripted chunk policy for reach: head for the goal, which the state observation carries (last 3 numbers)."""

    def predict_action_chunk(self, obs: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        state = obs["state"][:, -1]  # [B, 39]
        delta = torch.clamp(10.0 * (state[:, 36:39] - state[:, :3]), -1, 1)  # [B, 3]
        action = torch.cat([delta, torch.zeros_like(delta[:, :1])], dim=1)  # [B, 4]
        return action[:, None].expand(-1, 8, -1).clone()  # [B, H=8, 4]


def test_registry_matches_metaworld_and_import_stays_light():
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS, MT10_V3

    assert list(METAWORLD_TASKS) == list(ALL_V3_ENVIRONMENTS)
    assert list(MT10_TASKS) == list(MT10_V3)  # task ids follow MetaWorld's MT10 order
    assert {f"metaworld/{n}" for n in (*METAWORLD_TASKS, "mt10")} <= set(task_names())
    code = "import sys, envs.tasks; print('metaworld' in sys.modules or 'mujoco' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_expert_demos_succeed_and_store_layout(reach_data):
    task, report = reach_data
    assert report["episodes"] == 4 and report["success_rate"] == 1.0 and report["failed_seeds"] == {}
    buf = ReplayBuffer.load(report["path"])
    assert sorted(buf.data) == ["action", "reward", "state", "success", "task"]
    n = buf.n_steps
    assert report["steps"] == n and buf.n_episodes == 4
    assert buf.data["state"].shape == (n, 39) and buf.data["state"].dtype == np.float32
    assert buf.data["action"].shape == (n, 4) and np.abs(buf.data["action"]).max() <= 1.0
    assert buf.data["task"].dtype == np.int64 and not buf.data["task"].any()
    # every episode ends at its first success: success only on the last step, whose reward is 1
    ends = buf.episode_ends
    assert buf.data["success"].sum() == 4 and buf.data["success"][ends - 1].all()
    assert np.all(buf.data["reward"][ends - 1] == 1.0) and np.all((buf.data["reward"] >= 0) & (buf.data["reward"] <= 1))
    lengths = buf.episode_lengths
    assert report["episode_length"] == {"min": lengths.min(), "mean": lengths.mean(), "max": lengths.max()}
    assert lengths.min() > 10 and lengths.max() < 500
    # episodes replay: regenerating seed 1 gives the stored episode exactly
    episode = rollout_expert(task.env_fn(0)(), 1, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(episode["state"], buf.get_episode(1)["state"])


def test_action_noise_changes_executed_actions(tmp_path):
    env = MetaWorldEnv("reach-v3")
    clean = rollout_expert(env, 3, 0.0, np.random.default_rng(0))
    noisy = rollout_expert(env, 3, 0.3, np.random.default_rng(0))
    np.testing.assert_array_equal(clean["state"][0], noisy["state"][0])  # same initial state
    first = noisy["action"][0] - clean["action"][0]
    assert np.abs(first).mean() > 0.05 and np.abs(noisy["action"]).max() <= 1.0
    report = reach_task(tmp_path).generate(2, action_noise=0.3, progress=False)
    assert report["action_noise"] == 0.3 and report["episodes"] == 2


def test_eval_env_protocol_rewards_termination_seeds():
    env = MetaWorldEnv("reach-v3", max_steps=200)
    a, _ = env.reset(seed=7)
    b, _ = MetaWorldEnv("reach-v3").reset(seed=7)
    c, _ = env.reset(seed=8)
    np.testing.assert_array_equal(a["state"], b["state"])
    assert not np.allclose(a["state"][36:], c["state"][36:])  # the goal moves with the seed
    env.reset(seed=7)
    rewards, terminated = [], False
    for _ in range(200):
        _, reward, terminated, truncated, info = env.step(env.expert_action())
        rewards.append(reward)
        assert terminated == info["success"] and not truncated
        if terminated:
            break
    assert terminated and rewards[-1] == 1.0 and all(0.0 <= r < 1.0 for r in rewards[:-1])
    short = MetaWorldEnv("reach-v3", max_steps=3)
    short.reset(seed=0)
    flags = [short.step(np.zeros(4, np.float32))[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]


def test_datasets_windows_and_successful_demos_only(reach_data, tmp_path):
    task, report = reach_data
    train, val = task.datasets(horizon=16, n_obs_steps=2, n_action_steps=8)
    batch = train.get_batch(torch.arange(3))
    assert batch["obs"]["state"].shape == (3, 2, 39) and batch["action"].shape == (3, 16, 4)
    assert set(batch["obs"]) == set(task.shape_meta["obs"]) == {"state"}
    lengths = ReplayBuffer.load(report["path"]).episode_lengths
    assert len(train) + len(val) == int((lengths - 16 + 1 + 1 + 7).sum())  # padded n_obs-1 before, n_act-1 after
    # a failed demo is kept in the store but not imitated; offline RL sees it
    buf = ReplayBuffer.load(report["path"])
    buf.data["success"][buf.episode_ends[0] - 1] = False
    buf.save(tmp_path / "flagged.zarr")
    flagged = make_task(TaskConfig(name="metaworld/reach-v3", dataset_path=str(tmp_path / "flagged.zarr")))
    imitation = sum(len(d) for d in flagged.datasets(16, 2, 8))
    offline = flagged.datasets(16, 2, 8, transitions=True)
    assert imitation == len(train) + len(val) - (lengths[0] - 7)
    assert sum(len(d) for d in offline) == len(train) + len(val)
    assert offline[0].get_batch(torch.arange(2))["reward"].shape == (2, 8)


def test_evaluate_scripted_and_idle_policies(tmp_path):
    task = reach_task(tmp_path, max_steps=150, n_envs=1)
    good = task.evaluate(GoalReacher(), n_obs_steps=2, n_action_steps=4, n_episodes=2, progress=False)
    assert good.success_rate == 1.0 and good.success_per_task == {"reach-v3": 1.0} and good.score == 1.0
    assert good.seeds == [100000, 100001] and max(good.lengths) < 150
    idle = make_task(TaskConfig(name="metaworld/reach-v3", max_steps=5, n_envs=1))
    result = idle.evaluate(GoalReacher(), n_obs_steps=1, n_action_steps=1, n_episodes=1, progress=False)
    assert result.lengths == [5] and result.success_rate == 0.0 and 0.0 < result.score < 1.0


def test_mt10_task_ids_and_shape_meta():
    task = make_task(TaskConfig(name="metaworld/mt10"))
    assert task.env_names == MT10_TASKS
    assert task.shape_meta == {"obs": {"state": [39], "task": [], "task_onehot": [10]}, "action": [4]}
    for task_id in (0, 7):
        obs, _ = task.env_fn(task_id)().reset(seed=0)
        assert obs["task"].dtype == np.int64 and int(obs["task"]) == task_id
        np.testing.assert_array_equal(obs["task_onehot"], np.eye(10, dtype=np.float32)[task_id])
    assert "task" not in MetaWorldEnv("push-v3").reset(seed=0)[0]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'metaworld/push-v9'"):
        make_task(TaskConfig(name="metaworld/push-v9"))
    task = reach_task(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"robodiff data generate task=metaworld/reach-v3 n_episodes="):
        task.datasets(16, 2, 8)
    with pytest.raises(ValueError, match=r"must not overlap the evaluation seeds 100000..100049"):
        task.generate(10, seed=99995, progress=False)
    with pytest.raises(ValueError, match=r"action_noise must be a finite std >= 0, got -0.1"):
        task.generate(1, action_noise=-0.1, progress=False)
    with pytest.raises(ValueError, match=r"task_id must be in \[0, n_tasks=10\), got 10"):
        MetaWorldEnv("reach-v3", task_id=10, n_tasks=10)


def test_render_frame():
    reason = rendering_error()
    if reason is not None:
        pytest.skip(f"no OpenGL backend for MuJoCo offscreen rendering (set MUJOCO_GL=egl or osmesa): {reason}")
    env = MetaWorldEnv("reach-v3")
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (224, 224, 3) and frame.dtype == np.uint8 and frame.std() > 0


def test_robodiff_train_and_eval_on_reach(reach_data, tmp_path):
    """`robodiff train task=metaworld/reach-v3` end to end (tiny Diffusion Policy); video=true without a GL backend
    skips the video instead of failing."""
    from cli.main import cmd_eval, cmd_train

    task, report = reach_data
    run_dir = tmp_path / "run"
    out = cmd_train(
        [
            "task=metaworld/reach-v3",
            f"task.dataset_path={report['path']}",
            "task.eval_episodes=1",
            "task.max_steps=6",
            "task.n_envs=1",
            *TINY_DP,
            *TWO_STEPS,
            "train.batch_size=16",
            "logger=none",
            "video=true",
            f"run_dir={run_dir}",
        ]
    )
    assert out["step"] == 2 and out["n_episodes"] == 1 and 0.0 <= out["score"] <= 1.0
    result = cmd_eval([f"checkpoint={out['latest']}", "n_episodes=2", "n_envs=1", "max_steps=4", "video=false"])
    assert result["n_episodes"] == 2 and result["success_per_task"].keys() == {"reach-v3"}


def test_mode_reads_mt10_task_ids(tmp_path):
    from policies.mode import MoDEConfig

    task = make_task(TaskConfig(name="metaworld/mt10", dataset_path=str(tmp_path / "mt10.zarr"), val_ratio=0.0))
    rng = np.random.default_rng(0)
    buffer = ReplayBuffer()
    for task_id in range(10):  # one short synthetic episode per task: this test is about the task-id path only
        n = 12
        buffer.add_episode(
            {
                "state": rng.normal(size=(n, 39)).astype(np.float32),
                "action": rng.uniform(-1, 1, (n, 4)).astype(np.float32),
                "reward": np.zeros(n, np.float32),
                "success": np.arange(n) == n - 1,
                "task": np.full(n, task_id, np.int64),
            }
        )
    buffer.save(task.dataset_path)
    train, _ = task.datasets(8, 2, 4)
    batch = train.get_batch(torch.arange(len(train)))
    assert set(batch["obs"]["task"][:, -1].tolist()) == set(range(10))
    policy = MoDEConfig(n_tasks=10, horizon=8, n_action_steps=4, embed_dim=16, n_layers=1, n_heads=2).build(
        task.shape_meta
    )
    policy.fit_normalizer(train.normalizer_data())
    policy.compute_loss(batch)[0].backward()
    assert batch["obs"]["task"].dtype == torch.int64
    assert policy.model.task_emb.weight.grad.abs().sum(dim=1).gt(0).all()
    task.config.max_steps, task.config.n_envs = 2, 1
    result = task.evaluate(policy.eval(), n_obs_steps=2, n_action_steps=4, n_episodes=1, progress=False)
    assert list(result.success_per_task) == list(MT10_TASKS) and result.n_episodes == 10


def test_image_observations_generate_train_and_eval(tmp_path):
    """task.image_size: rendered corner-camera images + the hand instead of the 39-number state, through data
    generation (robodiff data generate ... image_size=S), the image dataset, training and evaluation."""
    reason = rendering_error()
    if reason is not None:
        pytest.skip(f"no OpenGL backend for MuJoCo offscreen rendering (set MUJOCO_GL=egl or osmesa): {reason}")
    from cli.data_cmd import cmd_data
    from cli.main import cmd_train

    env = MetaWorldEnv("reach-v3", image_size=32)
    obs, _ = env.reset(seed=0)
    assert sorted(obs) == ["agent_pos", "image"] and env.observation_space["image"].shape == (3, 32, 32)
    assert obs["image"].shape == (3, 32, 32) and obs["image"].dtype == np.float32 and obs["image"].min() >= 0.0
    assert obs["image"].max() <= 1.0 and obs["image"].std() > 0
    np.testing.assert_array_equal(obs["agent_pos"], env.state[:4])
    moved, *_ = env.step(np.array([1.0, 0.0, 0.0, 0.0], np.float32))
    assert not np.array_equal(moved["image"], obs["image"])  # the frame follows the arm

    store = tmp_path / "reach_image.zarr"
    report = cmd_data(["generate", "task=metaworld/reach-v3", "n_episodes=2", f"out={store}", "image_size=32"])
    assert report["episodes"] == 2 and report["success_rate"] == 1.0
    buf = ReplayBuffer.load(store)
    assert buf.data["image"].shape == (buf.n_steps, 32, 32, 3) and buf.data["image"].dtype == np.uint8
    task = make_task(TaskConfig(name="metaworld/reach-v3", dataset_path=str(store), image_size=32, val_ratio=0.0))
    assert task.shape_meta["obs"] == {"image": [3, 32, 32], "agent_pos": [4]}
    train, _ = task.datasets(8, 2, 4)
    batch = train.get_batch(torch.arange(3))
    assert batch["obs"]["image"].shape == (3, 2, 3, 32, 32) and batch["obs"]["image"].max() <= 1.0
    state_only = ReplayBuffer()
    state_only.add_episode({k: v[:5] for k, v in buf.data.items() if k != "image"})
    state_only.save(tmp_path / "state_only.zarr")
    no_images = TaskConfig(name="metaworld/reach-v3", dataset_path=str(tmp_path / "state_only.zarr"), image_size=32)
    with pytest.raises(ValueError, match=r"has no rendered images .*task.image_size=32"):
        make_task(no_images).load()
    with pytest.raises(ValueError, match="image_size must be an int >= 8"):
        MetaWorldEnv("reach-v3", image_size=4)

    out = cmd_train(
        [
            "task=metaworld/reach-v3",
            f"task.dataset_path={store}",
            "task.image_size=32",
            "task.val_ratio=0.0",
            "task.eval_episodes=1",
            "task.max_steps=4",
            "task.n_envs=1",
            *TINY_DP,
            "policy.crop_shape=[28,28]",
            "policy.vision_keypoints=4",
            *TWO_STEPS,
            "train.batch_size=8",
            "logger=none",
            "video=false",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    assert out["step"] == 2 and out["n_episodes"] == 1 and 0.0 <= out["score"] <= 1.0
