"""robosuite Lift / Can benchmark: Diffusion Policy (state observations) trained on scripted demonstrations for a
wall-clock budget, then robomimic's success rate over 50 seeds (100000..100049, at most 400 steps each).
(Not named robosuite.py: run as a script, its directory comes first on sys.path and that name would shadow the
package.)

Writes a JSON with the simulator's warm steps/s, the training budget used (steps, seconds, threads) and the
evaluation result. The demonstrations must exist (``robodiff data generate task=robosuite/<task> n_episodes=...``).

    OMP_NUM_THREADS=1 python benchmarks/robosuite_bench.py --task lift --budget-min 40 --steps 2000 \
        --out bench_results/robosuite_lift.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from cli.main import cmd_train
from envs.robosuite import RobosuiteEnv, rollout_expert
from envs.tasks import TaskConfig, make_task


def env_steps_per_s(task: str, n_steps: int = 300) -> dict:
    """Warm simulator throughput: one scripted episode first (robosuite's numba kernels compile on first use), then
    ``n_steps`` steps holding the current pose."""
    t0 = time.perf_counter()
    env = RobosuiteEnv(task)
    make_s = time.perf_counter() - t0
    rollout_expert(env, 0)
    obs, _ = env.reset(seed=1)
    expert_action = np.concatenate([obs["robot0_eef_pos"], np.zeros(7)])
    expert_action[3:9] = [1, 0, 0, 0, -1, 0]  # a top-down gripper: x column (1, 0, 0), y column (0, -1, 0)
    expert_action[9] = -1.0
    t0 = time.perf_counter()
    for _ in range(n_steps):
        env.step(expert_action)
    steps_per_s = n_steps / (time.perf_counter() - t0)
    env.close()
    return {"env_make_s": make_s, "env_steps_per_s_warm": steps_per_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["lift", "can"], required=True)
    parser.add_argument("--budget-min", type=float, default=40.0, help="training wall-clock cap (minutes)")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps (cosine schedule length)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument("--n-envs", type=int, default=10, help="simulator processes during evaluation")
    parser.add_argument("--dataset-path", default=None)
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--extra", nargs="*", default=[], help="more robodiff train overrides")
    args = parser.parse_args()

    name = f"robosuite/{args.task}"
    task_cfg = TaskConfig(name=name, dataset_path=args.dataset_path, max_steps=400)
    demos = make_task(task_cfg).load()  # fails early, naming the generate command, when there is no data
    stamp = dt.datetime.now()
    sim = env_steps_per_s(args.task)
    print(json.dumps(sim), flush=True)
    run_dir = args.run_dir or f"runs/bench/{stamp:%Y%m%d_%H%M%S}_robosuite_{args.task}"
    overrides = [
        f"task={name}",
        "policy=diffusion_unet",
        f"train.steps={args.steps}",
        f"train.max_time_s={args.budget_min * 60}",
        f"train.batch_size={args.batch_size}",
        "train.num_threads=1",
        f"train.warmup_steps={min(500, args.steps // 10)}",
        "train.val_every=0",
        "train.log_every=100",
        f"task.eval_episodes={args.eval_episodes}",
        f"task.n_envs={args.n_envs}",
        *([f"task.dataset_path={args.dataset_path}"] if args.dataset_path else []),
        "logger=none",
        "video=false",
        f"run_dir={run_dir}",
        *args.extra,
    ]
    print("robodiff train " + " ".join(overrides), flush=True)
    summary = cmd_train(overrides)
    result = {
        "date": stamp.isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": 1},
        "command": f"python benchmarks/robosuite_bench.py --task {args.task} --budget-min {args.budget_min} "
        f"--steps {args.steps} --batch-size {args.batch_size}"
        + (f" --extra {' '.join(args.extra)}" if args.extra else ""),
        "train_overrides": overrides,
        "demos": {"n_episodes": demos.n_episodes, "n_steps": demos.n_steps},
        **sim,
        "budget_min": args.budget_min,
        "steps_done": summary["step"],
        "train_time_s": summary["train_time_s"],
        "success_rate": summary.get("success_rate"),
        "n_episodes": summary.get("n_episodes"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "checkpoint": summary["latest"],
    }
    out = Path(args.out or f"bench_results/robosuite_{args.task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
