"""The adaptation run: a frozen base from a checkpoint, one RL method, the environment loop, evaluations at
environment-step milestones, atomic checkpoints that resume, metrics and a learning-curve plot.

Step 0 evaluates the base itself on the task's test seeds; every milestone (``eval_at`` and every ``eval_every``
steps) evaluates the adapter (deterministic: the residual's mean, DSRL's mean latent) on the same seeds and saves
``checkpoints/latest`` (the adapted policy, loadable by ``robodiff eval`` and ``deploy``, plus ``rl_state.*`` to
resume). Environment steps count real simulator steps only (``rl.env_loop.EnvLoop.env_steps``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from envs.tasks import TaskConfig, make_task
from policies.checkpoint import load_policy, load_state, save_checkpoint
from policies.train import rng_state, seed_everything, set_rng_state
from rl.env_loop import REWARDS, EnvLoop, EpisodeStats
from rl.methods import MethodConfig, MethodContext

STATE_TENSORS = "rl_state.safetensors"
STATE_META = "rl_state.json"


@dataclasses.dataclass
class AdaptLoopConfig:
    total_env_steps: int = 100_000
    eval_at: list[int] = dataclasses.field(default_factory=lambda: [25_000, 50_000, 100_000])
    eval_every: int = 0  # also evaluate every this many env steps (0: only eval_at and the end)
    eval_episodes: int = 50  # on the task's test seeds (Push-T: 100000..)
    n_envs: int = 16
    reward: str = "dense"  # rl.env_loop.REWARDS
    seed: int = 0
    log_every: int = 5_000  # env steps between training-statistics records

    def __post_init__(self) -> None:
        for name in ("total_env_steps", "eval_episodes", "n_envs", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0 or self.seed < 0:
            raise ValueError(f"eval_every and seed must be >= 0, got {self.eval_every} and {self.seed}")
        if any(s < 1 for s in self.eval_at):
            raise ValueError(f"eval_at must list env steps >= 1, got {self.eval_at}")
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {self.reward!r}")

    def milestones(self) -> list[int]:
        """Env-step counts at which the adapter is evaluated and saved, ending with ``total_env_steps``."""
        steps = {s for s in self.eval_at if s <= self.total_env_steps} | {self.total_env_steps}
        if self.eval_every:
            steps |= set(range(self.eval_every, self.total_env_steps, self.eval_every))
        return sorted(steps)


def check_base(base_config: dict, task_shape_meta: dict, base_checkpoint: str | Path, task_name: str) -> None:
    """The base must observe and act in the task's spaces; the error names both."""
    saved = base_config["shape_meta"]
    if saved["obs"] != task_shape_meta["obs"] or list(saved["action"]) != list(task_shape_meta["action"]):
        raise ValueError(
            f"base checkpoint {base_checkpoint} observes {saved['obs']} and acts in {saved['action']}, but task "
            f"'{task_name}' has observations {task_shape_meta['obs']} and actions {task_shape_meta['action']}"
        )


def adapt(
    method: MethodConfig,
    base_checkpoint: str | Path,
    run_dir: str | Path,
    loop_config: AdaptLoopConfig,
    task_config: TaskConfig,
    log: Callable[[dict], None],
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
    video: bool = False,
) -> dict[str, Any]:
    """Adapt the base at ``base_checkpoint`` with ``method``; writes ``run_dir/checkpoints/latest`` and
    ``run_dir/learning_curve.png``; ``log(record)`` receives every metrics record. Returns a summary."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints" / "latest"
    task = make_task(task_config)
    base = load_policy(base_checkpoint, device=device)
    check_base({"shape_meta": base.shape_meta}, task.shape_meta, base_checkpoint, task_config.name)
    seed_everything(loop_config.seed)
    loop = EnvLoop(
        task.obs_mode,
        loop_config.n_envs,
        base.config.n_obs_steps,
        max_steps=task_config.max_steps,
        reward=loop_config.reward,
        seed=loop_config.seed,
        device=device,
    )
    algo = method.build(
        base,
        loop,
        MethodContext(seed=loop_config.seed, device=device, task=task, env_step_budget=loop_config.total_env_steps),
    )
    evals: list[dict] = []
    if resume:
        evals = load_run_state(ckpt_dir, algo, loop)
    started = time.perf_counter()

    def evaluate(policy: Any, step: int, name: str) -> dict:
        result = task.evaluate(
            policy,
            n_obs_steps=policy.config.n_obs_steps,
            n_action_steps=policy.config.n_action_steps,
            n_episodes=loop_config.eval_episodes,
            video_path=run_dir / "videos" / f"{name}_{step}.mp4" if video else None,
            progress=False,
            device=device,
        )
        record = {
            "step": step,
            "policy": name,
            "eval/score": result.score,
            "eval/success_rate": result.success_rate,
            "eval/mean_length": result.mean_length,
            "wall_time_s": time.perf_counter() - started,
        }
        evals.append(record)
        log(record)
        return record

    try:
        if not evals:
            evaluate(base, 0, "base")
        milestones = [m for m in loop_config.milestones() if m > loop.env_steps]
        next_log = (loop.env_steps // loop_config.log_every + 1) * loop_config.log_every
        bar = tqdm(
            total=loop_config.total_env_steps,
            initial=loop.env_steps,
            desc=f"adapt {method.type}",
            unit="step",
            disable=not progress,
        )
        while milestones:
            before = loop.env_steps
            logs = algo.iterate()
            bar.update(loop.env_steps - before)
            if loop.env_steps >= next_log:
                record = {"step": loop.env_steps, **loop.recent_stats(50), **logs}
                log(record)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in record.items() if k.startswith("train/")})
                next_log = (loop.env_steps // loop_config.log_every + 1) * loop_config.log_every
            if loop.env_steps >= milestones[0]:
                while milestones and loop.env_steps >= milestones[0]:
                    milestones.pop(0)
                evaluate(algo.adapter, loop.env_steps, method.type)
                _save_state(ckpt_dir, algo, loop, evals, task_config, method, loop_config, base_checkpoint)
                plot_learning_curve(evals, run_dir / "learning_curve.png", title=f"{method.type} on {task_config.name}")
        bar.close()
    finally:
        algo.close()
        loop.close()
    base_eval = evals[0]  # step 0: the base itself
    final = evals[-1]
    return {
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt_dir),
        "method": method.type,
        "env_steps": loop.env_steps,
        "base_score": base_eval["eval/score"],
        "base_success_rate": base_eval["eval/success_rate"],
        "score": final["eval/score"],
        "success_rate": final["eval/success_rate"],
        "wall_time_s": final["wall_time_s"],
    }


def _save_state(
    ckpt_dir: Path,
    algo: Any,
    loop: EnvLoop,
    evals: list[dict],
    task_config: TaskConfig,
    method: MethodConfig,
    loop_config: AdaptLoopConfig,
    base_checkpoint: str | Path,
) -> None:
    tensors, meta = algo.state()
    rng_tensors, rng_meta = rng_state()
    meta = {
        "method": meta,
        "rng": rng_meta,
        "loop": {
            "env_steps": loop.env_steps,
            "next_episode": loop.next_episode,
            "episodes": [dataclasses.asdict(e) for e in loop.episodes],
        },
        "evals": evals,
    }
    extra = {
        "task": dataclasses.asdict(task_config),
        "rl": {
            "method": method.type,
            "config": dataclasses.asdict(method),
            "loop": dataclasses.asdict(loop_config),
            "base_checkpoint": str(base_checkpoint),
            "env_steps": loop.env_steps,
        },
    }
    save_checkpoint(
        algo.adapter,
        ckpt_dir,
        extra_config=extra,
        extra_files={
            STATE_TENSORS: save_safetensors({**tensors, **rng_tensors}),
            STATE_META: json.dumps(meta).encode(),
        },
    )


def load_run_state(ckpt_dir: Path, algo: Any, loop: EnvLoop) -> list[dict]:
    """Restore adapter weights, method state, loop counters and RNGs from ``ckpt_dir``; returns the evaluations so
    far. Rounds restart at a round boundary: the episodes of the interrupted round are run again with new seeds."""
    if not (ckpt_dir / STATE_META).exists():
        raise FileNotFoundError(f"cannot resume: {ckpt_dir / STATE_META} does not exist (no saved adaptation run)")
    missing, unexpected = algo.adapter.load_state_dict(load_state(ckpt_dir / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{ckpt_dir} does not hold this method's adapter: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    meta = json.loads((ckpt_dir / STATE_META).read_text())
    tensors = load_safetensors((ckpt_dir / STATE_TENSORS).read_bytes())
    algo.load_state(tensors, meta["method"])
    set_rng_state(tensors, meta["rng"])
    loop.env_steps = meta["loop"]["env_steps"]
    loop.next_episode = meta["loop"]["next_episode"]
    loop.episodes = [EpisodeStats(**e) for e in meta["loop"]["episodes"]]
    return meta["evals"]


def plot_learning_curve(evals: list[dict], path: Path, title: str) -> None:
    """Success rate and score against environment steps, as a PNG (the base at step 0)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    steps = np.array([e["step"] for e in evals])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [e["eval/success_rate"] for e in evals], "o-", label="success rate")
    ax.plot(steps, [e["eval/score"] for e in evals], "s--", label="score")
    ax.set_xlabel("environment steps")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
