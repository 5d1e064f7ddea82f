"""Data-parallel training: rank shards of the global batch, 2 gloo processes in lockstep, torchrun CLI runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import policies  # noqa: F401  (registers the policies)
from data.pusht import shape_meta
from data.sequence import SequenceDataset
from policies import distributed
from policies.registry import config_class, make_policy
from policies.train import Trainer, TrainLoopConfig, flatten_optimizer, seed_everything

POLICIES = {
    "diffusion_unet": dict(down_dims=[16, 32], diffusion_step_embed_dim=16, horizon=8, n_action_steps=4),
    # top-1 of 4 experts routed by the noise level: a rank's 4 samples leave experts unrouted
    "mode": dict(embed_dim=32, n_layers=2, n_heads=2, expert_hidden_dim=32, top_k=1, horizon=8, n_action_steps=4),
}


def tiny_dataset() -> SequenceDataset:
    rng = np.random.default_rng(0)
    n = 120
    obs = {"state": rng.uniform(0, 512, (n, 20)).astype(np.float32)}
    action = rng.uniform(0, 512, (n, 2)).astype(np.float32)
    return SequenceDataset(obs, action, np.array([50, 120]), horizon=8, n_obs_steps=2, n_action_steps=4)


def make_trainer(name: str, run_dir: Path, steps: int) -> Trainer:
    seed_everything(0)
    ds = tiny_dataset()
    policy = make_policy(config_class(name)(**POLICIES[name]), shape_meta("state"))
    policy.fit_normalizer(ds.normalizer_data())
    cfg = TrainLoopConfig(
        steps=steps, batch_size=8, warmup_steps=2, checkpoint_every=2, log_every=1, val_every=0, seed=0, lr=1e-3
    )
    return Trainer(policy, ds, cfg, run_dir, progress=False, log_fn=lambda record: None)


def state_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Raw weights, EMA weights and optimizer state of one rank."""
    opt, _ = flatten_optimizer(trainer.optimizer)
    return {
        **{f"policy.{k}": v for k, v in trainer.policy.state_dict().items()},
        **{f"ema.{k}": v for k, v in trainer.ema.model.state_dict().items()},
        **opt,
    }


def rank_worker(rank: int, world: int, port: int, tmp: Path) -> None:
    """One of ``world`` gloo processes, with torchrun's environment. Writes its final states to tmp/rank<r>.*"""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    # a hang (a gradient bucket one rank never all-reduces) fails the test after 120 s instead of blocking it
    distributed.init_process_group("cpu", timeout_s=120)
    try:
        out = {}
        for name in POLICIES:
            # every rank its own run directory: only rank 0's may hold anything
            straight = make_trainer(name, tmp / f"{name}_rank{rank}", steps=4)
            out |= {f"{name}.init.{k}": v.clone() for k, v in straight.policy.state_dict().items()}
            straight.fit()
            out |= {f"{name}.{k}": v for k, v in state_of(straight).items()}
        out["rng"] = torch.get_rng_state()
        # Exact resume with 2 processes: 2 steps, then a fresh trainer resumes rank 0's checkpoint for 2 more.
        shared = tmp / "resume_run"
        make_trainer("diffusion_unet", shared, steps=2).fit()
        resumed = make_trainer("diffusion_unet", shared, steps=4)
        torch.manual_seed(123)  # scramble this rank's RNG: resume must restore it
        resumed.resume(shared / "checkpoints" / "latest")
        resumed.fit()
        out |= {f"resumed.{k}": v for k, v in state_of(resumed).items()}
        save_file({k: v.contiguous() for k, v in out.items()}, tmp / f"rank{rank}.safetensors")
    finally:
        distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_shards_make_up_the_global_batch():
    ds = tiny_dataset()
    single = list(ds.iterate(8, torch.Generator().manual_seed(3), start_batch=2))
    for world in (2, 4):
        shards = [
            list(ds.iterate(8, torch.Generator().manual_seed(3), start_batch=2, rank=r, world_size=world))
            for r in range(world)
        ]
        assert all(len(s) == len(single) for s in shards)
        for i, batch in enumerate(single):
            assert all(s[i]["action"].shape[0] == 8 // world for s in shards)
            assert torch.equal(torch.cat([s[i]["action"] for s in shards]), batch["action"])
            assert torch.equal(torch.cat([s[i]["obs"]["state"] for s in shards]), batch["obs"]["state"])
    with pytest.raises(ValueError, match=r"batch_size=6 must be divisible by world_size=4 \(it is the global batch\)"):
        next(ds.iterate(6, torch.Generator(), world_size=4))
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        next(ds.iterate(8, torch.Generator(), rank=2, world_size=2))


def test_two_gloo_processes_train_in_lockstep(tmp_path):
    mp.spawn(rank_worker, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    r0, r1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert r0.keys() == r1.keys()
    for key in r0:
        if key != "rng":  # every rank its own noise stream, everything else identical, bit for bit
            assert torch.equal(r0[key], r1[key]), f"{key} differs between the ranks"
    assert not torch.equal(r0["rng"], r1["rng"])
    for name in POLICIES:
        trained = [k for k in r0 if k.startswith(f"{name}.policy.") and "normalizer" not in k]
        assert trained and all(k.replace(".policy.", ".init.") in r0 for k in trained)
        assert any(not torch.equal(r0[k], r0[k.replace(".policy.", ".init.")]) for k in trained), name
        # only rank 0 writes checkpoints
        latest = tmp_path / f"{name}_rank0" / "checkpoints" / "latest"
        assert (latest / "model.safetensors").exists() and not (tmp_path / f"{name}_rank1").exists()
        meta = json.loads((latest / "train_state.json").read_text())
        assert meta["world_size"] == 2 and {"rng", "rng.rank1"} <= meta.keys()
    # 2 + 2 resumed steps end where 4 uninterrupted steps do
    for key in (k for k in r0 if k.startswith("resumed.")):
        assert torch.equal(r0[key], r0["diffusion_unet." + key.removeprefix("resumed.")]), key


def test_batch_size_must_split_over_the_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(ValueError, match=r"train.batch_size=8 must be divisible by the number of processes \(3\)"):
        make_trainer("diffusion_unet", tmp_path, steps=2)


def test_cuda_device_index_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="train.device=cuda:1 under torchrun: use train.device=cuda"):
        distributed.training_device("cuda:1")
    assert distributed.training_device("cpu") == torch.device("cpu")


TINY = [
    "task=pusht_state",
    "policy=diffusion_unet",
    "policy.down_dims=[16,32]",
    "policy.diffusion_step_embed_dim=16",
    "policy.horizon=8",
    "policy.n_action_steps=4",
    "train.batch_size=16",
    "train.log_every=1",
    "train.val_every=0",
    "train.warmup_steps=2",
    "train.num_threads=1",
    "task.eval_episodes=1",
    "task.max_steps=4",
    "task.n_envs=1",
    "logger=none",
    "video=false",
]


def robodiff(*args: str, nproc: int | None = None) -> subprocess.CompletedProcess:
    """``python -m cli.main``, or under torchrun (``python -m torch.distributed.run`` is the torchrun script)."""
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, "-m", "cli.main", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


@pytest.mark.slow
def test_torchrun_world_of_one_equals_a_plain_run_and_resumes_with_two(tmp_path, pusht_path):
    plain, launched = tmp_path / "plain", tmp_path / "torchrun"
    robodiff("train", *TINY, "train.steps=3", f"run_dir={plain}")
    robodiff("train", *TINY, "train.steps=3", f"run_dir={launched}", nproc=1)
    assert losses(plain) == losses(launched) and len(losses(plain)) == 3
    for name in ("model.safetensors", "train_state.safetensors", "train_state.json"):
        a, b = (d / "checkpoints" / "latest" / name for d in (plain, launched))
        assert a.read_bytes() == b.read_bytes(), f"{name} differs with torchrun"

    # The plain run resumed by 2 processes: the global batch order continues, rank 0 alone logs and writes.
    proc = robodiff("train", f"resume={plain}", "train.steps=5", nproc=2)
    assert "rank 1: " in proc.stdout and "no RNG state for this rank" in proc.stdout
    assert [step for step, _ in losses(plain)] == [1, 2, 3, 4, 5]
    meta = json.loads((plain / "checkpoints" / "latest" / "train_state.json").read_text())
    assert meta["step"] == 5 and meta["world_size"] == 2 and "rng.rank1" in meta
    assert sorted(p.name for p in plain.iterdir()) == [
        "checkpoints",
        "config.json",
        "metrics.jsonl",
        "overrides.json",
    ]
