"""OFQL diagnostic: does the trained critic rank action chunks usefully on Push-T?

Samples K one-step chunks per query from an OFQL checkpoint, scores them with the critics (min of the two heads)
and executes the best one ("argmax") or one drawn from softmax(Q) ("softmax", Diffusion Q-Learning's action
selection at evaluation). K = 1 is the checkpoint's own one-step policy. If the critic ranks chunks by their return,
selection should raise the rollout score; if it lowers it, the critic prefers chunks it overvalues, and its Q term
in training can only pull the actor the same way.

    python benchmarks/ofql_q_selection.py --checkpoint runs/bench/probe15/ofql_eta0/checkpoints/latest --candidates 1 16
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from envs.evaluate import evaluate
from policies.checkpoint import load_policy
from policies.ofql import OFQLPolicy


class QSelected(torch.nn.Module):
    """The chunk-policy contract (``predict_action_chunk``) over an OFQL policy with critic selection among K.
    An injected ``noise`` is not used: the K candidates draw their own (a diagnostic, not a deployable source)."""

    def __init__(self, policy: OFQLPolicy, candidates: int, mode: str) -> None:
        super().__init__()
        self.policy, self.k, self.mode = policy, candidates, mode

    @torch.no_grad()
    def predict_action_chunk(self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        p = self.policy
        b = p.check_obs(obs)
        cond = p.encode_obs(obs).repeat_interleave(self.k, 0)  # [B * K, To * Do]
        chunks = p.sample_normalized(cond, torch.randn(b * self.k, p.config.horizon, p.action_dim))
        flat = chunks.flatten(1)
        q = torch.minimum(p.qf1(cond, flat), p.qf2(cond, flat)).view(b, self.k)
        pick = q.argmax(1) if self.mode == "argmax" else torch.multinomial(torch.softmax(q, 1), 1).squeeze(1)
        best = chunks.view(b, self.k, *chunks.shape[1:])[torch.arange(b), pick]
        return p.normalizer.unnormalize("action", best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="an ofql checkpoint (Push-T state)")
    parser.add_argument("--candidates", type=int, nargs="+", default=[1, 16], help="K values; 1 = no selection")
    parser.add_argument("--modes", nargs="+", default=["argmax", "softmax"], choices=["argmax", "softmax"])
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed-start", type=int, default=100000, help="first environment seed (test: 100000)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the sampling noise")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench_results/ofql_q_selection.json")
    args = parser.parse_args()
    if min(args.candidates) < 1:
        raise SystemExit(f"--candidates must be >= 1, got {args.candidates}")
    torch.set_num_threads(args.threads)
    policy = load_policy(args.checkpoint)
    if not isinstance(policy, OFQLPolicy):
        raise SystemExit(f"{args.checkpoint} is a {type(policy).__name__}, expected an OFQL checkpoint")
    c = policy.config
    rows = []
    for k in args.candidates:
        for mode in args.modes if k > 1 else ["none"]:
            torch.manual_seed(args.seed)
            result = evaluate(
                policy if k == 1 else QSelected(policy, k, mode),
                obs_mode="state",
                n_episodes=args.episodes,
                seed_start=args.seed_start,
                n_obs_steps=c.n_obs_steps,
                n_action_steps=c.n_action_steps,
                progress=False,
            )
            rows.append({"candidates": k, "mode": mode, "score": result.score, "success_rate": result.success_rate})
            print(json.dumps(rows[-1]))
    out = {"checkpoint": str(args.checkpoint), "seed_start": args.seed_start, "seed": args.seed, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
