"""MeanFlow training step: the objective's jvp on the r < t samples only (policies.flow.meanflow_target) against one
jvp of the whole batch under autograd (the textbook form, kept here as the reference).

Times flow_loss forward + backward of a trained MeanFlow checkpoint at a training batch size, both variants
interleaved in one process so that the machine's load affects them alike, and checks that the two targets agree.

    python benchmarks/meanflow_step.py --checkpoint runs/bench/table/meanflow/checkpoints/latest
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from policies import flow
from policies.checkpoint import load_policy


def whole_batch_target(u_fn, z, r, t, v, *batch_args):
    """u_tgt from one jvp of the whole batch, the primal keeping its graph (the form before session 9)."""
    u, dudt = torch.func.jvp(
        lambda a, b, c: u_fn(a, b, c, *batch_args), (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t))
    )
    return u, (v - (t - r)[:, None, None] * dudt).detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a meanflow (or ofql) checkpoint")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench_results/meanflow_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    policy = load_policy(args.checkpoint)
    policy.train()
    c = policy.config
    obs = {k: torch.rand(args.batch_size, c.n_obs_steps, *s) for k, s in policy.shape_meta["obs"].items()}
    cond = policy.encode_obs(obs).detach()
    action = torch.randn(args.batch_size, c.horizon, policy.action_dim)

    z, v = torch.randn(2, args.batch_size, c.horizon, policy.action_dim)
    r, t = flow.sample_r_t(args.batch_size, c.time_distribution, c.ratio_r_neq_t)
    with torch.no_grad():
        _, new = flow.meanflow_target(policy.average_velocity, z, r, t, v, cond)
    _, ref = whole_batch_target(policy.average_velocity, z, r, t, v, cond)
    max_diff = (new - ref).abs().max().item()

    variants = {"whole_batch_jvp": whole_batch_target, "subset_jvp": flow.meanflow_target}
    current = flow.meanflow_target

    def step(fn) -> float:
        flow.meanflow_target = fn  # MeanFlowPolicy.flow_loss looks it up in policies.flow
        try:
            t0 = time.perf_counter()
            policy.zero_grad(set_to_none=True)
            loss, _ = policy.flow_loss(cond, action)
            loss.backward()
            return time.perf_counter() - t0
        finally:
            flow.meanflow_target = current

    for fn in variants.values():
        step(fn)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(step(fn))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    out = {
        "checkpoint": args.checkpoint,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "median_step_s": medians,
        "speedup": medians["whole_batch_jvp"] / medians["subset_jvp"],
        "max_target_difference": max_diff,
    }
    print(json.dumps(out, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
