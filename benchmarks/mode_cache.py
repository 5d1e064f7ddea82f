"""MoDE expert caching: batch-1 latency and FLOPs per action chunk, cached vs uncached, on Push-T state shapes.

Builds the default MoDE policy (random weights, or a checkpoint directory), then times ``predict_action_chunk`` at
batch 1 with ``expert_cache`` on and off, interleaved in one process (median of many runs after warm-up), counts
the FLOPs of one chunk of each with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and attention; elementwise
ops are not counted), checks that both give the same actions to 1e-5 and writes a JSON.

    python benchmarks/mode_cache.py --out bench_results/mode_cache.json
    python benchmarks/mode_cache.py --checkpoint runs/mode/checkpoints/best --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import policies  # noqa: F401  (registers every policy)
from data.pusht import shape_meta
from policies.checkpoint import load_policy
from policies.mode import MoDEPolicy
from policies.registry import config_class, make_policy


def build_policy(checkpoint: str | None, num_steps: int | None) -> MoDEPolicy:
    overrides = {} if num_steps is None else {"num_inference_steps": num_steps}
    if checkpoint:
        policy = load_policy(checkpoint, **overrides)
        if not isinstance(policy, MoDEPolicy):
            raise SystemExit(f"{checkpoint} holds a '{policy.config.type}' policy, not 'mode'")
        return policy
    torch.manual_seed(0)
    policy = make_policy(config_class("mode")(**overrides), shape_meta("state"))
    # Action range exactly [-1, 1]: raw = normalized units, so the 1e-5 check is on the sampler's own scale.
    action = torch.cat([-torch.ones(1, 2), torch.ones(1, 2), torch.rand(254, 2) * 2 - 1])
    policy.fit_normalizer({"state": torch.rand(256, 20) * 500, "action": action})
    return policy.eval()


def predict(policy: MoDEPolicy, obs: dict, noise: torch.Tensor, cached: bool) -> torch.Tensor:
    policy.config = dataclasses.replace(policy.config, expert_cache=cached)
    return policy.predict_action_chunk(obs, noise=noise)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a mode checkpoint directory (default: random weights)")
    parser.add_argument("--num-steps", type=int, default=None, help="sampling steps (default: the config's)")
    parser.add_argument("--repeats", type=int, default=200, help="timed runs of each variant")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench_results/mode_cache.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    policy = build_policy(args.checkpoint, args.num_steps)
    c = policy.config
    g = torch.Generator().manual_seed(0)
    obs = {k: torch.rand(1, c.n_obs_steps, *s, generator=g) * 500 for k, s in policy.shape_meta["obs"].items()}
    noise = torch.randn(1, c.horizon, policy.action_dim, generator=g)
    if c.n_tasks > 1:
        obs["task"] = torch.zeros(1, dtype=torch.long)

    uncached, cached = predict(policy, obs, noise, False), predict(policy, obs, noise, True)
    # Compared in normalized action units ([-1, 1] over the data's range), the sampler's own scale: a trained
    # checkpoint's raw actions are Push-T pixels (0..512), where float32 rounding alone is ~3e-5.
    norm = policy.normalizer.normalize
    max_diff = float((norm("action", cached) - norm("action", uncached)).abs().max())
    if max_diff > 1e-5:
        raise SystemExit(f"cached and uncached actions differ by {max_diff:.3g} > 1e-5 (normalized units)")

    flops = {}
    for name, flag in (("uncached", False), ("cached", True)):
        with FlopCounterMode(display=False) as counter:
            predict(policy, obs, noise, flag)
        flops[name] = counter.get_total_flops()

    for _ in range(args.warmup):
        predict(policy, obs, noise, False)
        predict(policy, obs, noise, True)
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    for i in range(args.repeats):  # interleaved, alternating which goes first, so drifting load hits both
        order = (("uncached", False), ("cached", True)) if i % 2 == 0 else (("cached", True), ("uncached", False))
        for name, flag in order:
            t0 = time.perf_counter()
            predict(policy, obs, noise, flag)
            times[name].append((time.perf_counter() - t0) * 1000)

    def summary(ts: list[float]) -> dict:
        ts = sorted(ts)
        return {"median_ms": statistics.median(ts), "p10_ms": ts[len(ts) // 10], "p90_ms": ts[(9 * len(ts)) // 10]}

    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.platform()} {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
        "threads": args.threads,
        "checkpoint": args.checkpoint,
        "num_inference_steps": c.num_inference_steps,
        "parameters": sum(p.numel() for p in policy.parameters()),
        "max_abs_diff": max_diff,
        "uncached": {**summary(times["uncached"]), "flops_per_chunk": flops["uncached"]},
        "cached": {**summary(times["cached"]), "flops_per_chunk": flops["cached"]},
        "speedup_median": statistics.median(times["uncached"]) / statistics.median(times["cached"]),
        "flops_ratio": flops["uncached"] / flops["cached"],
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
