"""MetaWorld MT10 benchmark: train one policy on state observations of the ten MT10 tasks for a wall-clock budget,
then report the success rate per task and its average over fixed seeds (100000.. per task, MetaWorld's 500 steps).

Data: MetaWorld's scripted experts, ``--demos`` successful-or-flagged episodes per task on seeds 0.. (generated into
the task's default store when missing: $ROBODIFF_DATA/metaworld/mt10.zarr or runs/data/metaworld/mt10.zarr).
Diffusion Policy sees the task as a one-hot (``task_onehot``); MoDE as its task token (``policy.n_tasks=10``).

    OMP_NUM_THREADS=1 python benchmarks/metaworld_mt10.py --policy diffusion_unet --budget-min 45 \
        --out bench_results/metaworld_mt10_dp.json
    OMP_NUM_THREADS=1 python benchmarks/metaworld_mt10.py --policy mode --budget-min 45 \
        --out bench_results/metaworld_mt10_mode.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
from pathlib import Path

import torch

from cli.main import cmd_train, compose
from envs.tasks import make_task
from policies.checkpoint import read_config
from policies.train import measure_step_time

TASK = "metaworld/mt10"


def policy_overrides(policy: str) -> list[str]:
    return [f"policy={policy}", *(["policy.n_tasks=10"] if policy == "mode" else [])]


def step_time_s(overrides: list[str], batch_size: int) -> float:
    """Median seconds per training step on the MT10 data, so that the cosine schedule's length matches the budget."""
    cfg = compose("train", overrides)
    return measure_step_time(cfg.policy, make_task(cfg.task), batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="diffusion_unet", help="registered policy name")
    parser.add_argument("--budget-min", type=float, default=45.0, help="training wall-clock budget (minutes)")
    parser.add_argument("--steps", type=int, default=0, help="schedule length; 0 = estimate from --budget-min")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--demos", type=int, default=100, help="expert episodes per task when generating data")
    parser.add_argument("--eval-episodes", type=int, default=20, help="evaluation seeds per task")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training (train.num_threads)")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--out", default="bench_results/metaworld_mt10.json")
    parser.add_argument("--extra", nargs="*", default=[], help="more robodiff train overrides")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    base = [f"task={TASK}", *policy_overrides(args.policy), *args.extra]
    task = make_task(compose("train", base).task)
    data_report = None
    if not task.dataset_path.exists():
        data_report = task.generate(args.demos)
    budget_s = args.budget_min * 60
    step_time = step_time_s(base, args.batch_size)
    steps = args.steps or int(budget_s / step_time)
    stamp = dt.datetime.now()
    run_dir = args.run_dir or f"runs/bench/{stamp:%Y%m%d_%H%M%S}_mt10_{args.policy}"
    overrides = [
        *base,
        f"train.steps={steps}",
        f"train.max_time_s={budget_s}",
        f"train.batch_size={args.batch_size}",
        f"train.num_threads={args.threads}",
        f"train.warmup_steps={min(500, steps // 10)}",
        "train.val_every=0",
        "train.log_every=100",
        f"train.checkpoint_every={max(steps // 10, 1)}",
        f"task.eval_episodes={args.eval_episodes}",
        "logger=none",
        "video=false",
        f"run_dir={run_dir}",
    ]
    print("robodiff train " + " ".join(overrides), flush=True)
    summary = cmd_train(overrides)
    # The final evaluation (the only one: train.eval_every=0) is stored with the best checkpoint.
    final = read_config(summary["best"])["eval"]
    result = {
        "date": stamp.isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "command": "python benchmarks/metaworld_mt10.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if v not in (None, [], 0)
        ),
        "train_overrides": overrides,
        "policy": args.policy,
        "budget_min": args.budget_min,
        "threads": args.threads,
        "calibrated_step_time_s": step_time,
        "steps_planned": steps,
        "steps_done": summary["step"],
        "train_time_s": summary["train_time_s"],
        "dataset": str(task.dataset_path),
        "data_report": data_report,
        "eval_episodes_per_task": args.eval_episodes,
        "eval_seeds": [task.config.eval_seed_start, task.config.eval_seed_start + args.eval_episodes - 1],
        "success_per_task": final["success_per_task"],
        "success_rate_mean": final["success_rate"],
        "score": final["score"],
        "eval_wall_time_s": final["wall_time_s"],
        "checkpoint": summary["latest"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
