"""Push-T benchmark: train Diffusion Policy (state) for a wall-clock budget, evaluate on the 50 test seeds.

Writes a JSON with score, success rate, training samples/s, peak memory and per-chunk inference latency at
batch 1 for DDPM-100, DDIM-10, DDIM-4 and DDIM-2. Run it on an otherwise idle machine (2 cores here: a second
job using both cores slows each of them several times).

    python benchmarks/pusht.py --budget-min 30 --out bench_results/pusht_206.json
    python benchmarks/pusht.py --budget-min 30 --max-train-episodes 90 --out bench_results/pusht_90.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from cli.main import cmd_train
from policies.checkpoint import load_policy
from policies.train import available_cores

LATENCY_SETTINGS = {"DDPM-100": ("ddpm", 100), "DDIM-10": ("ddim", 10), "DDIM-4": ("ddim", 4), "DDIM-2": ("ddim", 2)}


def chunk_latency_ms(checkpoint: Path, sampler: str, steps: int, repeats: int = 30) -> dict:
    """Median and p90 wall time of one ``predict_action_chunk`` call at batch 1."""
    policy = load_policy(checkpoint, sampler=sampler, num_inference_steps=steps)
    c = policy.config
    obs = {k: torch.rand(1, c.n_obs_steps, *shape) * 100 for k, shape in policy.shape_meta["obs"].items()}
    for _ in range(3):
        policy.predict_action_chunk(obs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        policy.predict_action_chunk(obs)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-min", type=float, default=30.0, help="training wall-clock budget (minutes)")
    parser.add_argument("--steps", type=int, default=0, help="schedule length; 0 = estimate from --budget-min")
    parser.add_argument("--step-time-s", type=float, default=0.55, help="step time used to estimate --steps")
    parser.add_argument("--max-train-episodes", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--out", default="bench_results/pusht.json")
    parser.add_argument("--extra", nargs="*", default=[], help="more robodiff train overrides")
    args = parser.parse_args()

    budget_s = args.budget_min * 60
    steps = args.steps or int(budget_s / args.step_time_s)
    stamp = dt.datetime.now()
    run_dir = args.run_dir or f"runs/bench/{stamp:%Y%m%d_%H%M%S}_pusht_{args.max_train_episodes or 'all'}"
    overrides = [
        "task=pusht_state",
        "policy=diffusion_unet",
        f"train.steps={steps}",
        f"train.max_time_s={budget_s}",
        f"train.batch_size={args.batch_size}",
        f"task.eval_episodes={args.eval_episodes}",
        "logger=none",
        f"run_dir={run_dir}",
        "train.val_every=0",
        "train.log_every=100",
        f"train.warmup_steps={min(500, steps // 10)}",
        *([f"task.max_train_episodes={args.max_train_episodes}"] if args.max_train_episodes else []),
        *args.extra,
    ]
    print("robodiff train " + " ".join(overrides), flush=True)
    summary = cmd_train(overrides)
    metrics = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [m["train/samples_per_s"] for m in metrics if "train/samples_per_s" in m][1:]  # first has warm-up
    latency = {name: chunk_latency_ms(Path(summary["latest"]), *setting) for name, setting in LATENCY_SETTINGS.items()}
    result = {
        "date": stamp.isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": available_cores(),
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "command": "python benchmarks/pusht.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if v not in (None, [], 0)
        ),
        "train_overrides": overrides,
        "max_train_episodes": args.max_train_episodes,
        "budget_min": args.budget_min,
        "steps_done": summary["step"],
        "train_time_s": summary["train_time_s"],
        "train_samples_per_s": statistics.median(rates) if rates else None,
        "score": summary.get("score"),
        "success_rate": summary.get("success_rate"),
        "n_episodes": summary.get("n_episodes"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "latency_batch1": latency,
        "checkpoint": summary["latest"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
