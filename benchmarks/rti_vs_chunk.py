"""RTI against open-loop DDIM-10 chunks on the 50 Push-T test seeds, repeated over sampling-noise seeds: a single
evaluation's score moves by a few hundredths with the sampling noise alone, more than the 0.02 being compared.

    python benchmarks/rti_vs_chunk.py --checkpoint runs/bench/pusht_206_lr5e-4/checkpoints/latest --seeds 0 1 2 \\
        --out bench_results/rti_vs_chunk.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import policies  # noqa: F401  (registers every policy)
from envs.evaluate import evaluate
from policies.checkpoint import load_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="torch seeds of the sampling noise")
    parser.add_argument("--rti-steps", type=int, default=3)
    parser.add_argument("--rti-start", type=float, default=0.3)
    parser.add_argument("--rti-every", type=int, default=1)
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed-start", type=int, default=100000, help="first environment seed (test: 100000)")
    parser.add_argument("--executors", nargs="+", default=["chunk", "rti"], choices=["chunk", "rti"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", default="bench_results/rti_vs_chunk.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    policy = load_policy(args.checkpoint)
    c = policy.config
    runs: dict[str, list[float]] = {kind: [] for kind in args.executors}
    for seed in args.seeds:
        for kind in runs:
            torch.manual_seed(seed)
            rti = {"rti_steps": args.rti_steps, "rti_start": args.rti_start, "rti_every": args.rti_every}
            options = rti if kind == "rti" else {}
            res = evaluate(
                policy,
                obs_mode="state",
                n_episodes=args.episodes,
                seed_start=args.seed_start,
                n_obs_steps=c.n_obs_steps,
                n_action_steps=c.n_action_steps,
                executor=kind,
                executor_options=options,
                progress=False,
            )
            runs[kind].append(res.score)
            print(f"seed {seed} {kind}: score {res.score:.3f} success {res.success_rate:.0%}", flush=True)
    summary = {k: {"scores": v, "mean": statistics.mean(v), "stdev": statistics.pstdev(v)} for k, v in runs.items()}
    if len(runs) == 2:
        summary["rti_minus_chunk"] = summary["rti"]["mean"] - summary["chunk"]["mean"]
    summary["args"] = vars(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
