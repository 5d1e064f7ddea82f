"""Speed against LeRobot 0.4.4's Diffusion Policy on this machine, same network (foundation issue's targets: training
throughput >= 1.5x LeRobot's, DDIM-10 latency per chunk at batch 1 <= 0.5x LeRobot's).

LeRobot 0.4.4 needs torch < 2.11, so it lives in its own virtual environment (on x86_64 PyPI's torch 2.9.1 is a CUDA
build of several GB; it runs on the CPU here). Each side runs in its own process (``--worker``), alternating
robodiff, lerobot, robodiff, lerobot, ... so that both see the same machine state; the figures are medians over the
rounds and the ratios are formed from them:

    python3 -m venv ../lerobot-venv
    ../lerobot-venv/bin/pip install torch==2.9.1 torchvision==0.24.1 && ../lerobot-venv/bin/pip install lerobot==0.4.4
    python benchmarks/lerobot_speed.py --lerobot-python ../lerobot-venv/bin/python \\
        --out bench_results/lerobot_speed.json

Both networks: 1-D conditional UNet, down_dims 64/128/256, kernel 5, 8 groups, step embedding 128, FiLM scale+bias,
horizon 16, 2 observation steps of 20 numbers (Push-T keypoints + agent position; LeRobot's ``observation.state`` [2]
+ ``observation.environment_state`` [18]), 2-D actions. A training step = loss (random timesteps and noise), backward,
optimizer step, batch 256: robodiff's ``measure_step_time`` on the real Push-T windows (normalization inside the
policy, AdamW, EMA update); LeRobot's ``DiffusionPolicy.forward`` on a batch of the same shapes (its normalization
runs in a separate processor pipeline, not timed; Adam, its preset; no EMA). Latency: one chunk at batch 1
(robodiff ``predict_action_chunk``; LeRobot ``DiffusionModel.generate_actions``), median of 30 calls after 3 warm-ups.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from timing import latency_ms

SHAPES = {"state": 2, "env_state": 18, "action": 2, "horizon": 16, "n_obs_steps": 2, "n_action_steps": 8}
DOWN_DIMS = (64, 128, 256)
SAMPLERS = {"DDIM-10": ("ddim", 10), "DDPM-100": ("ddpm", 100)}


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    return latency_ms(fn, repeats, warmup)["median_ms"]


def worker_robodiff(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import policies  # noqa: F401  (registers every policy)
    from envs.tasks import TaskConfig, make_task
    from policies.onnx_backend import use_onnx
    from policies.registry import config_from_dict, make_policy
    from policies.train import measure_step_time

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    task = make_task(TaskConfig(name="pusht_state"))
    values = {"down_dims": list(DOWN_DIMS), "horizon": SHAPES["horizon"], "n_obs_steps": SHAPES["n_obs_steps"]}
    config = config_from_dict("diffusion_unet", values)
    step_s = measure_step_time(config, task, args.batch_size, n=args.train_steps)
    out = {"torch": torch.__version__, "train_step_ms": step_s * 1000, "latency_ms": {}}
    if args.compile:  # train.compile=true: the loss through torch.compile (inductor)
        out["train_step_ms_compiled"] = 1000 * measure_step_time(
            config, task, args.batch_size, n=args.train_steps, compile=True
        )
    obs = {"state": torch.rand(1, SHAPES["n_obs_steps"], 20) * 100}
    for name, (sampler, steps) in SAMPLERS.items():
        policy = make_policy(
            config_from_dict("diffusion_unet", {**values, "sampler": sampler, "num_inference_steps": steps}),
            task.shape_meta,
        )
        policy.fit_normalizer({"state": torch.rand(100, 20) * 500, "action": torch.rand(100, 2) * 500})
        policy.eval()
        out["parameters"] = sum(p.numel() for p in policy.parameters())
        with torch.no_grad():
            out["latency_ms"][name] = median_ms(lambda p=policy: p.predict_action_chunk(obs), args.repeats)
            if args.onnx:  # backend=onnx: the same policy's UNet through ONNX Runtime
                use_onnx(policy, threads=args.threads)
                out["latency_ms"][f"{name} onnx"] = median_ms(
                    lambda p=policy: p.predict_action_chunk(obs), args.repeats
                )
    return out


def worker_lerobot(args: argparse.Namespace) -> dict:
    import lerobot
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h, to = SHAPES["horizon"], SHAPES["n_obs_steps"]

    def make(sampler: str = "ddpm", steps: int | None = None) -> DiffusionPolicy:
        config = DiffusionConfig(
            input_features={
                "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(SHAPES["state"],)),
                "observation.environment_state": PolicyFeature(type=FeatureType.ENV, shape=(SHAPES["env_state"],)),
            },
            output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(SHAPES["action"],))},
            down_dims=DOWN_DIMS,
            horizon=h,
            n_obs_steps=to,
            n_action_steps=SHAPES["n_action_steps"],
            noise_scheduler_type=sampler.upper(),
            num_inference_steps=steps,
            device="cpu",
        )
        return DiffusionPolicy(config)

    policy = make()
    opt = torch.optim.Adam(policy.parameters(), lr=1e-4, betas=(0.95, 0.999), eps=1e-8, weight_decay=1e-6)
    b = args.batch_size
    batch = {
        "observation.state": torch.rand(b, to, SHAPES["state"]) * 2 - 1,
        "observation.environment_state": torch.rand(b, to, SHAPES["env_state"]) * 2 - 1,
        "action": torch.rand(b, h, SHAPES["action"]) * 2 - 1,
        "action_is_pad": torch.zeros(b, h, dtype=torch.bool),
    }

    def step() -> None:
        loss, _ = policy.forward(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    policy.train()
    step_ms = median_ms(step, args.train_steps, warmup=2)
    out = {
        "lerobot": lerobot.__version__,
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in policy.parameters()),
        "train_step_ms": step_ms,
        "latency_ms": {},
    }
    obs = {
        "observation.state": torch.rand(1, to, SHAPES["state"]),
        "observation.environment_state": torch.rand(1, to, SHAPES["env_state"]),
    }
    for name, (sampler, steps) in SAMPLERS.items():
        p = make(sampler, steps)
        p.eval()
        with torch.no_grad():
            out["latency_ms"][name] = median_ms(lambda p=p: p.diffusion.generate_actions(obs), args.repeats)
    return out


def run_worker(python: str, impl: str, args: argparse.Namespace) -> dict:
    cmd = [python, __file__, "--worker", impl, "--threads", str(args.threads), "--batch-size", str(args.batch_size)]
    cmd += (
        ["--train-steps", str(args.train_steps), "--repeats", str(args.repeats)]
        + ["--compile"] * args.compile
        + ["--onnx"] * args.onnx
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{impl} worker failed ({' '.join(cmd)}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lerobot-python", help="python of the virtual environment with lerobot==0.4.4")
    parser.add_argument("--worker", choices=["robodiff", "lerobot"], help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (each runs both sides)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps per round")
    parser.add_argument("--repeats", type=int, default=30, help="timed chunk queries per sampler per round")
    parser.add_argument("--compile", action="store_true", help="also time robodiff's step with train.compile=true")
    parser.add_argument("--onnx", action="store_true", help="also time robodiff's chunks with backend=onnx")
    parser.add_argument("--out", default="bench_results/lerobot_speed.json")
    args = parser.parse_args()
    if args.worker:
        fn = worker_robodiff if args.worker == "robodiff" else worker_lerobot
        print(json.dumps(fn(args)))
        return
    if not args.lerobot_python:
        parser.error("--lerobot-python is required (the python of a venv with lerobot==0.4.4; see the docstring)")
    rounds: dict[str, list[dict]] = {"robodiff": [], "lerobot": []}
    for r in range(args.rounds):
        for impl, python in (("robodiff", sys.executable), ("lerobot", args.lerobot_python)):
            res = run_worker(python, impl, args)
            rounds[impl].append(res)
            print(
                f"round {r} {impl}: train step {res['train_step_ms']:.0f} ms, "
                + ", ".join(f"{k} {v:.1f} ms" for k, v in res["latency_ms"].items()),
                flush=True,
            )
    summary: dict = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "rounds": rounds}
    for impl, rs in rounds.items():
        step = statistics.median(x["train_step_ms"] for x in rs)
        summary[impl] = {
            "parameters": rs[0]["parameters"],
            "torch": rs[0]["torch"],
            "train_step_ms": step,
            "train_samples_per_s": args.batch_size / step * 1000,
            "latency_ms": {k: statistics.median(x["latency_ms"][k] for x in rs) for k in rs[0]["latency_ms"]},
        }
        if "train_step_ms_compiled" in rs[0]:
            compiled = statistics.median(x["train_step_ms_compiled"] for x in rs)
            summary[impl].update(
                train_step_ms_compiled=compiled, train_samples_per_s_compiled=args.batch_size / compiled * 1000
            )
    ours, theirs = summary["robodiff"], summary["lerobot"]
    summary["ratios"] = {
        "train_throughput_robodiff_over_lerobot": ours["train_samples_per_s"] / theirs["train_samples_per_s"],
        **(
            {
                "train_throughput_compiled_robodiff_over_lerobot": ours["train_samples_per_s_compiled"]
                / theirs["train_samples_per_s"]
            }
            if "train_samples_per_s_compiled" in ours
            else {}
        ),
        **{
            f"latency_{k}_robodiff_over_lerobot": ours["latency_ms"][k] / theirs["latency_ms"][k.removesuffix(" onnx")]
            for k in ours["latency_ms"]
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("robodiff", "lerobot", "ratios")}, indent=2))


if __name__ == "__main__":
    main()
