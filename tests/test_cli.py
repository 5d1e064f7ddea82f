"""Subprocess smoke tests of every CLI command on a tiny config and the shared Push-T data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TINY = [
    "task=pusht_state",
    "policy=diffusion_unet",
    "policy.down_dims=[16,32]",
    "policy.diffusion_step_embed_dim=16",
    "policy.horizon=8",
    "policy.n_action_steps=4",
    "train.batch_size=16",
    "train.log_every=2",
    "train.val_every=0",
    "train.warmup_steps=2",
    "task.eval_episodes=2",
    "task.max_steps=12",
    "task.n_envs=1",
    "logger=none",
    "video=false",
]


def robodiff(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"robodiff {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_resume_eval(tmp_path, pusht_path):
    run_dir = tmp_path / "run"
    out = last_json(robodiff("train", *TINY, "train.steps=4", "train.checkpoint_every=2", f"run_dir={run_dir}"))
    latest = run_dir / "checkpoints" / "latest"
    assert (latest / "model.safetensors").exists() and (latest / "train_state.json").exists()
    assert out["step"] == 4 and 0.0 <= out["score"] <= 1.0 and out["n_episodes"] == 2
    assert json.loads((run_dir / "config.json").read_text())["policy"]["down_dims"] == [16, 32]
    assert [r["step"] for r in metrics(run_dir) if "train/loss" in r] == [2, 4]

    # Resume continues from step 4 with the saved overrides and only runs the missing steps.
    out = last_json(robodiff("train", f"resume={run_dir}", "train.steps=6"))
    assert out["step"] == 6
    assert [r["step"] for r in metrics(run_dir) if "train/loss" in r] == [2, 4, 6]
    assert json.loads((latest / "config.json").read_text())["step"] == 6

    proc = robodiff("eval", f"checkpoint={latest}", "n_episodes=2", "n_envs=1", "max_steps=12", "video=true")
    result = last_json(proc)
    assert {"score", "success_rate", "n_episodes"} <= set(result) and result["n_episodes"] == 2
    assert (latest / "eval" / "eval.json").exists() and (latest / "eval" / "rollout.mp4").stat().st_size > 0

    # The sampling noise is seeded: the same command gives the same episodes.
    reruns = []
    for i in range(2):
        out_dir = tmp_path / f"seeded_{i}"
        robodiff(
            "eval",
            f"checkpoint={latest}",
            "n_episodes=2",
            "max_steps=12",
            "video=false",
            "seed=3",
            f"output_dir={out_dir}",
        )
        reruns.append(json.loads((out_dir / "eval.json").read_text()))
    assert reruns[0]["seed"] == 3
    assert reruns[0]["max_rewards"] == reruns[1]["max_rewards"] and reruns[0]["lengths"] == reruns[1]["lengths"]

    # Warm-started RTI through the same evaluation; an option of another executor is a clear error.
    result = last_json(
        robodiff(
            "eval",
            f"checkpoint={latest}",
            "n_episodes=1",
            "max_steps=6",
            "video=false",
            "executor=rti",
            "rti_steps=2",
            f"output_dir={tmp_path / 'rti'}",
        )
    )
    assert result["n_episodes"] == 1
    proc = robodiff("eval", f"checkpoint={latest}", "executor=chunk", "rti_steps=2", check=False)
    assert proc.returncode == 2 and "rti_steps" in proc.stderr and "Traceback" not in proc.stderr

    # The trained tiny policy in the real-time loop on the simulated robot, synchronous RTI and asynchronous chunks.
    for executor in ("rti", "async"):
        out_dir = tmp_path / f"deploy_{executor}"
        result = last_json(
            robodiff(
                "deploy",
                f"checkpoint={latest}",
                f"executor={executor}",
                "max_duration_s=2",
                "loop.merge_rule=freeze",
                f"output_dir={out_dir}",
                "video=false",
            )
        )
        assert result["mode"] == ("async" if executor == "async" else "sync") and result["estops"] == 0
        assert 0.0 <= result["score"] <= 1.0 and result["lateness_ms"]["p50"] < 5.0  # loose: shared CI machine
        assert result["inference_ms"]["p50"] > 0 and result["limit_events"]["rejected"] == 0
        ticks = json.loads((out_dir / "ticks_100000.json").read_text())
        assert 80 <= ticks["summary"]["ticks"] + ticks["summary"]["missed_ticks"] <= 101  # 2 s at 50 Hz
    proc = robodiff("deploy", f"checkpoint={latest}", "executor=warp", check=False)
    assert proc.returncode == 2 and "executor must be one of" in proc.stderr
    proc = robodiff("deploy", f"checkpoint={latest}", "loop.policy_hz=7", check=False)
    assert proc.returncode == 2 and "policy_hz must divide control_hz" in proc.stderr

    # Re-using a run directory without resume is refused instead of overwriting it.
    proc = robodiff("train", *TINY, "train.steps=2", f"run_dir={run_dir}", check=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr


def test_list_shows_tasks_policies_and_executors():
    out = robodiff("list").stdout
    names = {line.strip() for line in out.splitlines()}
    assert {"pusht_state", "pusht_image", "chunk", "ensemble", "rti", "streaming", "async"} <= names
    family = {"diffusion_unet", "diffusion_transformer", "flow_unet", "mode", "streaming", "meanflow", "ofql"}
    assert family <= names, family - names
    assert {"residual_ppo", "residual_sac", "dsrl", "dsrl_na", "world_model"} <= names  # RL methods


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("policy.down_dimz=[8]", "Key 'down_dimz' not in 'DiffusionUnetConfig'"),
        ("train.steps=abc", "could not be converted to Integer"),
        ("+policy.foo=1", "adding or deleting keys is not allowed"),
        ("task=nope", "Could not find 'task/nope'"),
        ("policy.horizon=18", "horizon must be divisible by 4"),
        ("logger=tensorboard", "logger must be 'wandb' or 'none'"),
    ],
)
def test_bad_train_config_is_a_clear_error(override, message):
    proc = robodiff("train", override, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_eval_of_missing_checkpoint_and_unknown_command(tmp_path):
    proc = robodiff("eval", f"checkpoint={tmp_path / 'nothing'}", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = robodiff("fly", check=False)
    assert proc.returncode == 2 and "unknown command 'fly'" in proc.stderr


def test_missing_dataset_path_is_a_clear_error(tmp_path):
    proc = robodiff(
        "train",
        *TINY,
        "train.steps=2",
        f"task.dataset_path={tmp_path / 'none.zarr'}",
        f"run_dir={tmp_path / 'r'}",
        check=False,
    )
    assert proc.returncode != 0 and "Push-T dataset not found" in proc.stderr and "none.zarr" in proc.stderr


@pytest.mark.slow
def test_train_logs_to_wandb_offline(tmp_path, pusht_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    args = [a for a in TINY if a != "logger=none"]
    robodiff("train", *args, "logger=wandb", "train.steps=2", f"run_dir={run_dir}")
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and any(offline_runs[0].rglob("*.wandb"))
    assert [r["step"] for r in metrics(run_dir) if "train/loss" in r] == [2]
