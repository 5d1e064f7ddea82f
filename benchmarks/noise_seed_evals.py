"""Success and score of several checkpoints over several sampling-noise seeds, as a table, a JSON and a plot.

One 50-episode evaluation of a stochastic policy moves by several points of success with the sampling noise alone
(Push-T's DP-UNet: 28-46 % over five draws), so RL gains are compared on the mean over noise seeds. Each entry is
``label@steps=checkpoint``; every (entry, noise seed) runs ``robodiff eval checkpoint=<ckpt> seed=<n>`` once into
``<eval-root>/<label>_<steps>_noise<n>`` and is reused when its ``eval.json`` is already there, so an interrupted
run resumes. The plot draws success against environment steps per label (mean, and the range over noise seeds),
with the base (``--base``) as a band.

    python benchmarks/noise_seed_evals.py --base runs/bench/table30/diffusion_unet/checkpoints/latest \\
        --entries seed0@25000=runs/rl11/dsrl_na_off_sparse/checkpoints/latest \\
        seed0@100000=runs/rl12/na_s0/checkpoints/latest \\
        --noise-seeds 5 --eval-root runs/rl12/evals --sample-latent --out bench_results/dsrl_na_noise_seeds.json \\
        --plot docs/benchmarks/rl_dsrl_na_official.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def parse_entry(text: str) -> tuple[str, int, str]:
    """``label@steps=checkpoint`` -> (label, steps, checkpoint)."""
    try:
        head, checkpoint = text.split("=", 1)
        label, steps = head.split("@", 1)
        return label, int(steps), checkpoint
    except ValueError:
        raise SystemExit(
            f"entry {text!r}: expected label@steps=checkpoint, e.g. s0@25000=runs/x/checkpoints/latest"
        ) from None


def evaluate(checkpoint: str, noise_seed: int, out_dir: Path, sample_latent: bool) -> dict:
    """One 50-episode evaluation on the task's test seeds with torch seeded ``noise_seed`` (reused when done)."""
    result = out_dir / "eval.json"
    if not result.exists():
        cmd = ["robodiff", "eval", f"checkpoint={checkpoint}", f"seed={noise_seed}", "video=false"]
        cmd += [f"output_dir={out_dir}"] + (["sample_latent=true"] if sample_latent else [])
        print(" ".join(cmd), flush=True)
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    found = json.loads(result.read_text())
    if (found["checkpoint"], found["seed"]) != (checkpoint, noise_seed):
        raise SystemExit(
            f"{result} holds the evaluation of {found['checkpoint']} with noise seed {found['seed']}, not of "
            f"{checkpoint} with {noise_seed}: pick another --eval-root or label"
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the base checkpoint (evaluated with its own noise)")
    parser.add_argument("--entries", nargs="+", required=True, help="label@steps=checkpoint ...")
    parser.add_argument("--noise-seeds", type=int, default=5)
    parser.add_argument("--eval-root", default="runs/noise_seed_evals")
    parser.add_argument("--sample-latent", action="store_true", help="DSRL adapters: a fresh latent per chunk")
    parser.add_argument("--out", default="bench_results/noise_seed_evals.json")
    parser.add_argument("--plot", default=None, help="a PNG path for success against environment steps")
    args = parser.parse_args()

    root, seeds = Path(args.eval_root), range(args.noise_seeds)
    rows = [("base", 0, args.base, False)] + [(*parse_entry(e), args.sample_latent) for e in args.entries]
    results = []
    for label, steps, checkpoint, sample in rows:
        evals = [evaluate(checkpoint, n, root / f"{label}_{steps}_noise{n}", sample) for n in seeds]
        success = [e["success_rate"] for e in evals]
        score = [e["score"] for e in evals]
        results.append({"label": label, "steps": steps, "checkpoint": checkpoint, "success": success, "score": score})
        print(
            f"{label:>8} @ {steps:>6}: success {' / '.join(f'{s:.0%}' for s in success)} "
            f"mean {statistics.mean(success):.1%}, score mean {statistics.mean(score):.3f}",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2))
    if args.plot:
        plot(results, Path(args.plot))


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    base = results[0]["success"]
    ax.axhspan(min(base), max(base), color="gray", alpha=0.2, label="base: range over noise seeds")
    ax.axhline(statistics.mean(base), color="gray", label="base: mean")
    for label in dict.fromkeys(r["label"] for r in results[1:]):
        rs = sorted((r for r in results[1:] if r["label"] == label), key=lambda r: r["steps"])
        steps = [r["steps"] for r in rs]
        mean = [statistics.mean(r["success"]) for r in rs]
        low = [m - min(r["success"]) for m, r in zip(mean, rs, strict=True)]
        high = [max(r["success"]) - m for m, r in zip(mean, rs, strict=True)]
        ax.errorbar(steps, mean, yerr=[low, high], marker="o", capsize=3, label=label)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("success rate (50 test seeds)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
