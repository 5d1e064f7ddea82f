"""Does a DSRL run's critic value chunks the way the environment does?

Loads a `robodiff adapt method=dsrl` checkpoint (its adapter and twin critic), rolls out episodes on seeds no run
trains on, and for every decision compares Q(s, w / b) (the min of the twin critics) with the Monte-Carlo discounted
return-to-go that followed it. Two behaviours: latents w ~ N(0, I) clipped to the bound (the base's own behaviour)
and the learned actor's sampled latents. Prints and saves mean Q, mean return, their correlation, bias and RMSE.

    python benchmarks/dsrl_critic_check.py --checkpoint runs/rl/dsrl_s0/checkpoints/latest \
        --out bench_results/dsrl_critic.json

Returns-to-go stop at the episode's end (success or the step limit; no bootstrap past the limit), so for states
near the limit they are less negative than the infinite-horizon value the critic learns.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from policies.checkpoint import load_policy
from rl.dsrl import DSRLConfig
from rl.env_loop import EnvLoop
from rl.methods import MethodContext
from rl.run import load_run_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoints/latest of a dsrl adaptation run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of --n-envs episodes per behaviour")
    parser.add_argument("--n-envs", type=int, default=16)
    parser.add_argument("--loop-seed", type=int, default=7, help="EnvLoop seed: episodes on seeds 1e6 * (seed + 1)..")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench_results/dsrl_critic.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ckpt = Path(args.checkpoint)
    run_config = json.loads((ckpt.parents[1] / "config.json").read_text())
    if run_config.get("method") != "dsrl":
        raise SystemExit(
            f"{ckpt} is not a dsrl run (method {run_config.get('method')!r}); this check reads Q^W of dsrl"
        )
    config = DSRLConfig(**run_config["rl"])
    base = load_policy(run_config["base"])
    loop = EnvLoop(
        "state",
        args.n_envs,
        base.config.n_obs_steps,
        max_steps=run_config["task"]["max_steps"],  # the run's episode length
        reward=run_config["loop"]["reward"],
        seed=args.loop_seed,
    )
    algo = config.build(base, loop, MethodContext(seed=0))
    load_run_state(ckpt, algo, loop)  # adapter, critics, RNG; the loop's counters (its seeds go on from the run's)
    adapter, gamma, bound = algo.adapter, config.gamma, config.noise_bound

    out: dict = {"checkpoint": str(ckpt), "alpha": algo.log_alpha.exp().item()}
    for behaviour in ("base_noise", "actor"):
        torch.manual_seed(1)
        pairs: list[tuple[float, float]] = []
        first_episode = len(loop.episodes)
        for _ in range(args.rounds):
            obs = loop.reset()
            per_env: list[list[tuple[float, float, int]]] = [[] for _ in range(args.n_envs)]
            while not loop.round_over:
                x = adapter.actor_input(obs)
                with torch.no_grad():
                    if behaviour == "base_noise":
                        w = torch.randn(args.n_envs, *adapter.noise_shape).clamp(-bound, bound)
                    else:
                        w, _ = adapter.sample_noise(obs)
                    q = torch.min(*algo.qf(x, (w / bound).flatten(1))).numpy()
                    chunk = adapter.chunk_from_noise(obs, w)
                decision = loop.step(chunk[:, algo.exec_slice])
                r = decision.discounted_reward(gamma)
                for i in np.flatnonzero(decision.live):
                    per_env[i].append((float(q[i]), float(r[i]), int(decision.n_steps[i])))
                obs = decision.obs
            for rows in per_env:
                g, returns = 0.0, []
                for q_i, r_i, n_i in reversed(rows):
                    g = r_i + gamma**n_i * g
                    returns.append((q_i, g))
                pairs += returns[::-1]
        q_all, g_all = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        episodes = loop.episodes[first_episode:]
        out[behaviour] = {
            "decisions": len(pairs),
            "q_mean": float(q_all.mean()),
            "return_mean": float(g_all.mean()),
            "correlation": float(np.corrcoef(q_all, g_all)[0, 1]),
            "bias": float((q_all - g_all).mean()),
            "rmse": float(np.sqrt(((q_all - g_all) ** 2).mean())),
            "score": float(np.mean([e.max_reward for e in episodes])),
            "success_rate": float(np.mean([e.success for e in episodes])),
        }
        print(behaviour, json.dumps(out[behaviour]), flush=True)
    loop.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
