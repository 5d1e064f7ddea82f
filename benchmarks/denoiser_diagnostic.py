"""DDPM denoiser diagnostic: where along the noise levels does a Diffusion Policy checkpoint's prediction err?

On a fixed set of held-out Push-T windows (the dataset's validation split, state observations), reports

- the epsilon MSE in buckets of noise level k (k = 0 clean ... K-1 noisiest, ``policies.schedulers``), with
  levels drawn uniformly inside each bucket; a clean-sample (``prediction_type=sample``) network is measured
  through the epsilon that ``denoise`` derives from it, so every checkpoint is compared on the same quantity;
- the normalized-action MSE of full sampled chunks (the policy's own sampler) against the recorded chunk: over
  the whole horizon, over the executed actions (n_obs_steps - 1 ... + n_action_steps) and the first executed one.

Same windows, level draws and noise for every checkpoint (seeded), so rows compare. One forward per bucket, no
environment: it separates "the network is worse at these noise levels" from closed-loop effects.

    python benchmarks/denoiser_diagnostic.py --checkpoints runs/bench/table30/diffusion_unet/checkpoints/latest \
        runs/bench/table30/diffusion_transformer/checkpoints/latest --out bench_results/denoiser_diagnostic.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from data.pusht import make_pusht_datasets
from policies.checkpoint import load_policy
from policies.ddpm import DDPMPolicy

BUCKETS = ((0, 5), (5, 20), (20, 50), (50, 80), (80, 100))  # fractions of K in percent


def diagnose(policy: DDPMPolicy, batch: dict, seed: int) -> dict:
    c = policy.config
    K = c.num_train_timesteps
    gen = torch.Generator().manual_seed(seed)
    out: dict = {}
    with torch.no_grad():
        cond = policy.encode_obs(batch["obs"])
        a = policy.normalizer.normalize("action", batch["action"])
        for lo, hi in BUCKETS:
            k_lo, k_hi = lo * K // 100, max(hi * K // 100, lo * K // 100 + 1)
            k = torch.randint(k_lo, k_hi, (a.shape[0],), generator=gen)
            noise = torch.randn(a.shape, generator=gen)
            eps = policy.denoise(policy.schedule.add_noise(a, noise, k), k, cond)
            out[f"eps_mse_k{lo}-{hi}pct"] = torch.nn.functional.mse_loss(eps, noise).item()
        chunk = policy.predict_action_chunk(batch["obs"], generator=torch.Generator().manual_seed(seed + 1))
        err = (policy.normalizer.normalize("action", chunk) - a) ** 2
        first = c.n_obs_steps - 1
        out["chunk_mse_all"] = err.mean().item()
        out["chunk_mse_executed"] = err[:, first : first + c.n_action_steps].mean().item()
        out["chunk_mse_first_executed"] = err[:, first].mean().item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", nargs="+", required=True, help="DDPM-family checkpoints, Push-T state")
    parser.add_argument("--windows", type=int, default=1024, help="validation windows (drawn with --seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench_results/denoiser_diagnostic.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    windows = None
    val_sets: dict[tuple[int, int, int], Any] = {}  # one validation split per window shape, loaded once
    for path in args.checkpoints:
        policy = load_policy(path).eval()
        if not isinstance(policy, DDPMPolicy):
            raise SystemExit(f"{path} is a {type(policy).__name__}; expected diffusion_unet or diffusion_transformer")
        c = policy.config
        shape = (c.horizon, c.n_obs_steps, c.n_action_steps)
        if shape not in val_sets:
            val_sets[shape] = make_pusht_datasets(
                None, "state", horizon=c.horizon, n_obs_steps=c.n_obs_steps, n_action_steps=c.n_action_steps
            )[1]
        val = val_sets[shape]
        if windows is None:
            n = min(args.windows, len(val))
            windows = torch.randperm(len(val), generator=torch.Generator().manual_seed(args.seed))[:n]
        row = {"checkpoint": str(path), "policy": type(policy).__name__, "prediction_type": c.prediction_type}
        row.update(diagnose(policy, val.get_batch(windows), args.seed))
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"windows": len(windows), "seed": args.seed, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
