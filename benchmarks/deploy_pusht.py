"""Deployment benchmark on Push-T: executors scored on the 50 test seeds (lockstep simulation, `envs.evaluate`), and
the same executors driving the real-time simulated robot through the control loop (50 Hz control, 10 Hz policy,
inference in its own process) for loop lateness, missed ticks, inference latency and limit events.

    python benchmarks/deploy_pusht.py --checkpoint runs/bench/pusht_206_lr5e-4/checkpoints/latest \\
        --streaming-checkpoint runs/bench/table/streaming/checkpoints/latest --realtime-episodes 5 \\
        --out bench_results/deploy_pusht.json

``--only NAME ...`` re-runs those rows and keeps the others of ``--out``. Denoiser passes per executed action
are counted with a forward hook on ``policy.model`` over one 300-step episode of random observations through each
executor (the count does not depend on the observations). Run it alone on
the machine: real-time figures are only meaningful without another heavy job beside them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import policies  # noqa: F401  (registers every policy)
from deploy.loop import LoopConfig
from deploy.run import deploy_sim_pusht, pusht_limits
from envs.evaluate import evaluate
from envs.executor import make_executor
from policies.checkpoint import load_policy

RTI = {"rti_steps": 3, "rti_start": 0.3, "rti_every": 1}  # refine at every step
RTI_DEFAULT = {"rti_steps": 3, "rti_start": 0.2, "rti_every": 4}  # the executor's defaults
ENSEMBLE_K = 0.01


def passes_per_action(policy, kind: str, temporal_ensemble: float | None, options: dict, steps: int = 300) -> float:
    count = 0

    def hook(*_) -> None:
        nonlocal count
        count += 1

    handle = policy.model.register_forward_hook(hook)
    try:
        c = policy.config
        runner = make_executor(kind, policy, c.n_obs_steps, c.n_action_steps, temporal_ensemble, **options)
        runner.reset(1)
        rng = np.random.default_rng(0)
        for _ in range(steps):
            runner.act({k: rng.random((1, *s), dtype=np.float32) * 400 for k, s in policy.shape_meta["obs"].items()})
    finally:
        handle.remove()
    return count / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a Diffusion Policy (or flow) checkpoint: chunk/rti/...")
    parser.add_argument("--streaming-checkpoint", default=None, help="a streaming checkpoint for the streaming rows")
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument("--realtime-episodes", type=int, default=5)
    parser.add_argument("--max-duration-s", type=float, default=30.0)
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--out", default="bench_results/deploy_pusht.json")
    parser.add_argument("--resume", action="store_true", help="keep finished rows (and evaluations) of --out")
    parser.add_argument("--only", nargs="+", default=None, help="run only these rows afresh; keep the others of --out")
    args = parser.parse_args()
    torch.set_num_threads(2)

    # (row name, checkpoint, executor, executor options)
    rows = [
        ("chunk DDIM-10", args.checkpoint, "chunk", {}),
        (f"ensemble k={ENSEMBLE_K}", args.checkpoint, "ensemble", {"temporal_ensemble": ENSEMBLE_K}),
        ("rti 3 steps from 0.3", args.checkpoint, "rti", dict(RTI)),
        ("rti 3 steps from 0.2 every 4", args.checkpoint, "rti", dict(RTI_DEFAULT)),
        ("async chunks (freeze)", args.checkpoint, "async", {}),
    ]
    if args.streaming_checkpoint:
        rows += [
            ("streaming policy, chunk", args.streaming_checkpoint, "chunk", {}),
            ("streaming policy, streaming", args.streaming_checkpoint, "streaming", {}),
        ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "machine": platform.processor() or platform.machine(),
        "rows": {},
    }
    done = json.loads(out.read_text())["rows"] if out.exists() and (args.resume or args.only) else {}
    unknown = set(args.only or []) - {r[0] for r in rows}
    if unknown:
        parser.error(f"--only: unknown rows {sorted(unknown)}; rows: {[r[0] for r in rows]}")
    for name, ckpt, kind, options in rows:
        row: dict = {"checkpoint": ckpt, "executor": kind, "options": options}
        if args.only is not None:
            if name not in args.only:
                if name in done:
                    result["rows"][name] = done[name]
                continue
            done.pop(name, None)
        if "realtime" in done.get(name, {}):
            result["rows"][name] = done[name]
            continue
        row.update({k: v for k, v in done.get(name, {}).items() if k in ("eval", "passes_per_action")})
        if kind != "async":
            policy = load_policy(ckpt)
            ex_options = {k: v for k, v in options.items() if k != "temporal_ensemble"}
            row["passes_per_action"] = passes_per_action(policy, kind, options.get("temporal_ensemble"), ex_options)
            if not args.skip_eval and "eval" not in row:
                t = time.perf_counter()
                res = evaluate(
                    policy,
                    obs_mode="state",
                    n_episodes=args.eval_episodes,
                    n_obs_steps=policy.config.n_obs_steps,
                    n_action_steps=policy.config.n_action_steps,
                    executor=kind,
                    temporal_ensemble=options.get("temporal_ensemble"),
                    executor_options=ex_options,
                    progress=False,
                )
                row["eval"] = {"score": res.score, "success_rate": res.success_rate, "wall_s": time.perf_counter() - t}
                print(f"[eval] {name}: score {res.score:.3f} success {res.success_rate:.0%}", flush=True)
                result["rows"][name] = row
                out.write_text(json.dumps(result, indent=2, default=float))
        mode = "async" if kind == "async" else "sync"
        loop = LoopConfig(mode=mode, merge_rule="freeze" if mode == "async" else "replace", limits=pusht_limits())
        rt = deploy_sim_pusht(
            ckpt,
            loop,
            executor=kind,
            n_episodes=args.realtime_episodes,
            max_duration_s=args.max_duration_s,
            progress=False,
            **options,
        )
        row["realtime"] = {k: v for k, v in rt.items() if k not in ("episodes", "loop", "checkpoint")}
        print(
            f"[real time] {name}: score {rt['score']:.3f} success {rt['success_rate']:.0%} lateness p99 "
            f"{rt['lateness_ms']['p99']:.2f} ms p99.9 {rt['lateness_ms']['p99.9']:.2f} ms missed {rt['missed_ticks']} "
            f"inference p50/p99 {rt['inference_ms']['p50']:.1f}/{rt['inference_ms']['p99']:.1f} ms "
            f"limits {rt['limit_events']}",
            flush=True,
        )
        result["rows"][name] = row
        out.write_text(json.dumps(result, indent=2, default=float))  # partial results survive an interruption
    out.write_text(json.dumps(result, indent=2, default=float))  # rows kept from --out after the last one run
    print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
