"""Push-T benchmark: train one policy (state observations) for a wall-clock budget, evaluate on the 50 test seeds.

Writes a JSON with score, success rate, training samples/s, peak memory, denoiser passes per executed action (through
the policy's own executor, over a 300-step episode) and per-chunk inference latency at batch 1 (for Diffusion Policy
also DDPM-100, DDIM-10, DDIM-4, DDIM-2). Run it on an otherwise idle machine (2 cores here: a second job using both
cores slows each of them several times). `benchmarks/policy_table.py` runs it for every policy.

    python benchmarks/pusht.py --budget-min 30 --out bench_results/pusht_206.json
    python benchmarks/pusht.py --budget-min 30 --max-train-episodes 90 --out bench_results/pusht_90.json
    python benchmarks/pusht.py --policy streaming --budget-min 6 --out bench_results/table/streaming.json
    python benchmarks/pusht.py --inference-of <checkpoint> --set num_inference_steps=9   # no training: latency, passes
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import resource
import statistics
from pathlib import Path

import numpy as np
import torch
import yaml
from timing import latency_ms

from cli.main import cmd_train, compose
from envs.executor import make_executor
from envs.tasks import TaskConfig, make_task
from policies.checkpoint import load_policy
from policies.train import available_cores, measure_step_time

# Diffusion Policy's sampler settings (checkpoint overrides) timed besides the policy's own default.
DDPM_SETTINGS = {"DDPM-100": ("ddpm", 100), "DDIM-10": ("ddim", 10), "DDIM-4": ("ddim", 4), "DDIM-2": ("ddim", 2)}


def _obs(policy, batch: int = 1) -> dict[str, torch.Tensor]:
    c = policy.config
    return {k: torch.rand(batch, c.n_obs_steps, *shape) * 100 for k, shape in policy.shape_meta["obs"].items()}


def inference_figures(checkpoint: Path, overrides: dict | None = None) -> dict:
    """Batch-1 latency of one chunk query and denoiser passes per executed action over a 300-step episode;
    ``overrides`` replace policy config fields at load (e.g. num_inference_steps)."""
    overrides = overrides or {}
    policy = load_policy(checkpoint, **overrides)
    obs = _obs(policy)
    figures: dict = {"chunk_latency_batch1": latency_ms(lambda: policy.predict_action_chunk(obs))}
    stream = getattr(policy, "stream", None)
    if stream is not None:  # steady-state streaming query: s passes on a warm buffer
        _, buffer = stream(obs)
        figures["stream_latency_batch1"] = latency_ms(lambda: stream(obs, buffer))
    # Denoiser passes = calls of the policy's network (`policy.model`; critics and image encoders are not counted).
    # MoDE's expert cache runs fused layers outside `forward`; the number of passes is the same without it.
    if "expert_cache" in {f.name for f in dataclasses.fields(policy.config)}:
        policy = load_policy(checkpoint, **{**overrides, "expert_cache": False})
    passes = 0

    def count(*_) -> None:
        nonlocal passes
        passes += 1

    policy.model.register_forward_hook(count)
    kind = getattr(policy, "default_executor", "chunk")
    runner = make_executor(kind, policy, policy.config.n_obs_steps, policy.config.n_action_steps)
    runner.reset(1)
    steps = 300  # Push-T's episode limit
    rng = np.random.default_rng(0)
    shapes = policy.shape_meta["obs"]
    for _ in range(steps):
        runner.act({k: rng.random((1, *shape), dtype=np.float32) * 100 for k, shape in shapes.items()})
    figures.update(executor=kind, denoiser_passes_per_action=passes / steps, denoiser_passes_per_episode=passes)
    return figures


def calibrate_step_time(overrides: list[str], batch_size: int, n: int = 6) -> float:
    """Seconds per training step of the configured policy at ``batch_size`` on Push-T state, so that the cosine
    schedule's length matches the budget for every policy."""
    task = make_task(TaskConfig(name="pusht_state"))
    return measure_step_time(compose("train", overrides).policy, task, batch_size, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="diffusion_unet", help="registered policy name")
    parser.add_argument("--budget-min", type=float, default=30.0, help="training wall-clock budget (minutes)")
    parser.add_argument("--steps", type=int, default=0, help="schedule length; 0 = estimate from --budget-min")
    parser.add_argument(
        "--step-time-s", type=float, default=0.0, help="step time used to estimate --steps; 0 = measure it"
    )
    parser.add_argument("--max-train-episodes", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--out", default="bench_results/pusht.json")
    parser.add_argument("--extra", nargs="*", default=[], help="more robodiff train overrides")
    parser.add_argument("--inference-of", default=None, help="a checkpoint: print its inference figures, no training")
    parser.add_argument("--set", nargs="*", default=[], help="with --inference-of: policy fields, key=value (YAML)")
    args = parser.parse_args()
    if args.inference_of:
        torch.set_num_threads(available_cores())
        fields = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"--set takes key=value, got {item!r}")
            fields[key] = yaml.safe_load(value)
        print(json.dumps(inference_figures(Path(args.inference_of), fields), indent=2))
        return

    budget_s = args.budget_min * 60
    torch.set_num_threads(available_cores())
    step_time = args.step_time_s or calibrate_step_time(
        ["task=pusht_state", f"policy={args.policy}", *args.extra], args.batch_size
    )
    steps = args.steps or int(budget_s / step_time)
    stamp = dt.datetime.now()
    run_dir = args.run_dir or f"runs/bench/{stamp:%Y%m%d_%H%M%S}_{args.policy}_{args.max_train_episodes or 'all'}"
    overrides = [
        "task=pusht_state",
        f"policy={args.policy}",
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
    latest = Path(summary["latest"])
    inference = inference_figures(latest)
    if args.policy == "diffusion_unet":
        inference["sampler_latency_batch1"] = {}
        for name, (sampler, n) in DDPM_SETTINGS.items():
            policy = load_policy(latest, sampler=sampler, num_inference_steps=n)
            obs = _obs(policy)
            inference["sampler_latency_batch1"][name] = latency_ms(lambda p=policy, o=obs: p.predict_action_chunk(o))
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
        "policy": args.policy,
        "calibrated_step_time_s": step_time,
        "max_train_episodes": args.max_train_episodes,
        "budget_min": args.budget_min,
        "steps_done": summary["step"],
        "train_time_s": summary["train_time_s"],
        "train_samples_per_s": statistics.median(rates) if rates else None,
        "score": summary.get("score"),
        "success_rate": summary.get("success_rate"),
        "n_episodes": summary.get("n_episodes"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **inference,
        "checkpoint": summary["latest"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
