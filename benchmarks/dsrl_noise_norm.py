"""How does a diffusion policy's chunk quality depend on the norm of its initial noise?

DSRL steers a base policy through its initial noise w. This rolls out the base (DDIM, deterministic in w) on the
Push-T test seeds with w drawn by fixed rules that differ in norm and direction: fresh N(0, I) (the base's own
behaviour), N(0, I) rescaled to the typical norm sqrt(H * Da) (`rl.noise_space=sphere`), random signs times 1 (norm
sqrt(H * Da), the corner of DSRL's box for b = 1) and times 1.5 (DSRL's default box corner b = 1.5), zero, and
half-scale N(0, I). Torch is seeded before each rule, so the rules see the same initial states and draws.

    python benchmarks/dsrl_noise_norm.py --base runs/base_pusht90 --episodes 25 --out bench_results/dsrl_noise_norm.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from envs.evaluate import evaluate
from policies.checkpoint import load_policy
from rl.adapters import to_sphere


class FixedNoise:
    """The base with its initial noise drawn by ``rule(batch) -> [B, H, Da]`` (the policy contract's ``noise``)."""

    def __init__(self, base, rule: Callable[[int], torch.Tensor]) -> None:
        self.base, self.rule, self.config, self.shape_meta = base, rule, base.config, base.shape_meta

    def predict_action_chunk(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.base.predict_action_chunk(obs, noise=self.rule(obs[next(iter(obs))].shape[0]))


def rules(horizon: int, action_dim: int) -> dict[str, Callable[[int], torch.Tensor]]:
    shape = (horizon, action_dim)

    def gauss(b: int) -> torch.Tensor:
        return torch.randn(b, *shape)

    def signs(scale: float) -> Callable[[int], torch.Tensor]:
        return lambda b: scale * torch.sign(gauss(b))

    return {
        "N(0, I)": gauss,
        "N(0, I) on the sphere of radius sqrt(H Da)": lambda b: to_sphere(gauss(b)),  # rl.noise_space=sphere
        "random signs x 1 (norm sqrt(H Da))": signs(1.0),
        "random signs x 1.5 (norm 1.5 sqrt(H Da))": signs(1.5),
        "zero": lambda b: torch.zeros(b, *shape),
        "N(0, I) x 0.5": lambda b: 0.5 * gauss(b),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="checkpoint of a DDIM policy")
    parser.add_argument("--episodes", type=int, default=25, help="test seeds 100000.. per rule")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench_results/dsrl_noise_norm.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_policy(args.base)
    c = base.config
    out: dict = {"base": args.base, "episodes": args.episodes, "rules": {}}
    for name, rule in rules(c.horizon, base.action_dim).items():
        torch.manual_seed(0)
        r = evaluate(
            FixedNoise(base, rule),
            obs_mode="state",
            n_episodes=args.episodes,
            n_obs_steps=c.n_obs_steps,
            n_action_steps=c.n_action_steps,
            progress=False,
        )
        out["rules"][name] = {"score": r.score, "success_rate": r.success_rate}
        print(f"{name}: score {r.score:.3f}, success {r.success_rate:.0%}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
