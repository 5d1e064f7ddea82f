"""Push-T policy table: every registered policy trained for the same wall-clock budget on state observations, then
scored on the 50 test seeds, one after another (each in its own process, on an otherwise idle machine).

    python benchmarks/policy_table.py --budget-min 6 --out-dir bench_results/table

Runs ``benchmarks/pusht.py --policy <name>`` per policy (skipping those whose JSON already exists in --out-dir, so an
interrupted table resumes), then prints a Markdown table and writes ``table.json`` with ratios against Diffusion
Policy-UNet (DDIM-10): score difference, latency speed-up per chunk and denoiser passes per executed action.

Latencies in the table are re-measured at the end in one process, interleaved (each round times every policy in turn,
batch 1, 2 threads), so that their ratios are not skewed by the load on a shared machine at the different times each
policy's own run measured it (those per-run figures stay in each policy's JSON). ``--latency-threads`` and
``--backend onnx`` (the 1-D UNet policies through ONNX Runtime; the transformer policies stay in torch) re-measure
them in another setting, written to ``table_<backend>_<threads>t.{md,json}``:

    python benchmarks/policy_table.py --out-dir bench_results/table --backend onnx --latency-threads 1

``--latency-of NAME=CHECKPOINT ...`` only times the given checkpoints in the same interleaved way (the first is the
reference of the speed-up column) and writes ``<out-dir>/latency.json``, e.g. several training runs of one policy
against DP-UNet:

    python benchmarks/policy_table.py --out-dir bench_results/latency_onestep \
        --latency-of dp=runs/bench/table30/diffusion_unet/checkpoints/latest \
        mf=runs/bench/table30/meanflow/checkpoints/latest
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import policies  # noqa: F401  (registers every policy)
from policies.checkpoint import load_policy
from policies.networks.unet1d import ConditionalUnet1D
from policies.onnx_backend import BACKENDS, use_onnx
from policies.registry import policy_names

REFERENCE = "diffusion_unet"


def run(name: str, args: argparse.Namespace, out: Path) -> None:
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("pusht.py")),
        "--policy",
        name,
        "--budget-min",
        str(args.budget_min),
        "--eval-episodes",
        str(args.eval_episodes),
        "--batch-size",
        str(args.batch_size),
        "--run-dir",
        str(Path(args.run_root) / name),
        "--out",
        str(out),
    ]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def interleaved_latency(
    checkpoints: dict[str, Path], rounds: int = 15, repeats: int = 10, threads: int = 2, backend: str = "torch"
) -> dict[str, float]:
    """Median batch-1 latency (ms) of one action query per policy: a full chunk, or for a streaming policy one
    steady-state step of its rolling buffer. Every round times each policy ``repeats`` times in turn. ``backend``
    "onnx": every policy with a 1-D UNet runs it through ONNX Runtime (the others stay in torch)."""
    torch.set_num_threads(threads)
    calls = {}
    for name, path in checkpoints.items():
        policy = load_policy(path)
        if backend == "onnx" and isinstance(getattr(policy, "model", None), ConditionalUnet1D):
            use_onnx(policy, threads=threads)
        c = policy.config
        obs = {k: torch.rand(1, c.n_obs_steps, *shape) * 100 for k, shape in policy.shape_meta["obs"].items()}
        if hasattr(policy, "stream"):
            _, buffer = policy.stream(obs)
            calls[name] = lambda p=policy, o=obs, b=buffer: p.stream(o, b)
        else:
            calls[name] = lambda p=policy, o=obs: p.predict_action_chunk(o)
        for _ in range(3):  # warm-up
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def table(results: dict[str, dict], latency: dict[str, float] | None = None) -> tuple[str, dict]:
    ref = results.get(REFERENCE)
    rows, summary = [], {}
    header = (
        "| policy | steps | samples/s | score | success | score - DP | passes / action | passes vs DP | "
        "chunk latency b1 (ms) | speed-up vs DP DDIM-10 |"
    )
    rows += [header, "|" + "---|" * (header.count("|") - 1)]
    for name, r in results.items():
        if latency is not None:
            lat = latency[name]
        else:
            lat = r["chunk_latency_batch1"]["median_ms"]
            if "stream_latency_batch1" in r:  # steady-state streaming query (the rolling buffer's few passes)
                lat = r["stream_latency_batch1"]["median_ms"]
        entry = {
            "score": r["score"],
            "success_rate": r["success_rate"],
            "steps": r["steps_done"],
            "samples_per_s": r["train_samples_per_s"],
            "passes_per_action": r["denoiser_passes_per_action"],
            "latency_ms": lat,
        }
        if ref is not None:
            ref_lat = latency[REFERENCE] if latency is not None else ref["chunk_latency_batch1"]["median_ms"]
            entry.update(
                score_minus_dp=r["score"] - ref["score"],
                passes_reduction=ref["denoiser_passes_per_action"] / r["denoiser_passes_per_action"],
                speedup=ref_lat / lat,
            )
        summary[name] = entry
        rows.append(
            f"| {name} | {entry['steps']} | {entry['samples_per_s'] or float('nan'):.0f} | {entry['score']:.3f} | "
            f"{entry['success_rate']:.0%} | {entry.get('score_minus_dp', float('nan')):+.3f} | "
            f"{entry['passes_per_action']:.2f} | {entry.get('passes_reduction', float('nan')):.1f}x | {lat:.1f} | "
            f"{entry.get('speedup', float('nan')):.1f}x |"
        )
    return "\n".join(rows), summary


def latency_only(args: argparse.Namespace) -> None:
    checkpoints = {}
    for item in args.latency_of:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--latency-of expects NAME=CHECKPOINT, got {item!r}")
        if not Path(path).exists():
            raise SystemExit(f"--latency-of {name}: no checkpoint at {path}")
        checkpoints[name] = Path(path)
    latency = interleaved_latency(checkpoints, threads=args.latency_threads, backend=args.backend)
    ref = next(iter(latency.values()))
    rows = {
        name: {"latency_ms": ms, "speed_up": ref / ms, "checkpoint": str(checkpoints[name])}
        for name, ms in latency.items()
    }
    for name, row in rows.items():
        print(f"{name}: {row['latency_ms']:.2f} ms, {row['speed_up']:.2f}x")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"latency": "interleaved, one process", "latency_threads": args.latency_threads, "backend": args.backend}
    (out_dir / "latency.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-min", type=float, default=6.0)
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--policies", nargs="*", default=None, help=f"default: all ({', '.join(policy_names())})")
    parser.add_argument("--out-dir", default="bench_results/table")
    parser.add_argument("--run-root", default="runs/bench/table")
    parser.add_argument("--no-latency", action="store_true", help="use each run's own latency figures")
    parser.add_argument("--latency-threads", type=int, default=2, help="torch / ONNX Runtime threads for latency")
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="onnx: the UNet policies through ORT")
    parser.add_argument(
        "--latency-of",
        nargs="+",
        metavar="NAME=CHECKPOINT",
        help="only time these checkpoints, interleaved; the first is the speed-up reference",
    )
    args = parser.parse_args()
    if args.latency_of:
        latency_only(args)
        return
    names = args.policies or [REFERENCE] + [n for n in policy_names() if n != REFERENCE]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        out = out_dir / f"{name}.json"
        if not out.exists():
            run(name, args, out)
        results[name] = json.loads(out.read_text())
    latency = None
    if not args.no_latency:
        checkpoints = {name: Path(args.run_root) / name / "checkpoints" / "latest" for name in results}
        latency = interleaved_latency(checkpoints, threads=args.latency_threads, backend=args.backend)
    text, summary = table(results, latency)
    meta = {
        "budget_min": args.budget_min,
        "latency": "interleaved, one process" if latency else "per-run",
        "latency_threads": args.latency_threads,
        "backend": args.backend,
    }
    stem = (
        "table"
        if (args.backend, args.latency_threads) == ("torch", 2)
        else f"table_{args.backend}_{args.latency_threads}t"
    )
    (out_dir / f"{stem}.json").write_text(json.dumps({**meta, "rows": summary}, indent=2))
    (out_dir / f"{stem}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
