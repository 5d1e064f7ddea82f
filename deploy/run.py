"""Deploy a checkpoint on a robot: the inference process, the control loop and the robot, for one or more episodes.

``robodiff deploy`` calls `deploy_sim_pusht` (the simulated Push-T robot, scored like the benchmark: score = mean of
clip(max coverage / 0.95, 0, 1), success = coverage > 0.95, over seeds 100000...) or `deploy_robot` (any other
`Robot`, e.g. ROS 2 hardware: one run until its duration ends or the watchdog stops it).

Executors: every kind of `envs.executor.EXECUTORS` runs synchronously inside the inference process (one action per
policy tick, the executor's queue / ensemble / RTI / streaming state lives there); "async" runs the policy as a
plain chunk source (full chunks at ``t_obs + i * dt``, merged into the loop's timed queue by ``merge_rule``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data.io import atomic_file
from deploy.inference import InferenceProcess
from deploy.loop import ControlLoop, LoopConfig
from deploy.metrics import percentiles_ms
from deploy.safety import Limits
from deploy.sim_pusht import SimPushTRobot
from deploy.types import Robot
from envs.executor import EXECUTORS
from envs.pusht import SUCCESS_COVERAGE, WORKSPACE

DEPLOY_EXECUTORS = (*EXECUTORS, "async")


def inference_for(checkpoint: str | Path, executor: str | None, dt: float, **overrides: Any) -> InferenceProcess:
    """The inference process for ``executor`` (one of DEPLOY_EXECUTORS, None = the policy's own)."""
    if executor is not None and executor not in DEPLOY_EXECUTORS:
        raise ValueError(f"executor must be one of {DEPLOY_EXECUTORS}, got {executor!r}")
    if executor == "async":
        return InferenceProcess(checkpoint, executor="chunk", mode="async", dt=dt, **overrides)
    return InferenceProcess(checkpoint, executor=executor, mode="sync", dt=dt, **overrides)


def loop_mode(executor: str | None) -> str:
    return "async" if executor == "async" else "sync"


def _write_json(path: Path, payload: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, allow_nan=False, default=float))


def deploy_sim_pusht(
    checkpoint: str | Path,
    loop: LoopConfig,
    *,
    executor: str | None = None,
    n_episodes: int = 1,
    seed_start: int = 100000,
    max_duration_s: float = 30.0,
    output_dir: str | Path | None = None,
    video: bool = False,
    progress: bool = True,
    physics_hz: float = 100.0,
    **overrides: Any,
) -> dict[str, Any]:
    """Run ``n_episodes`` real-time Push-T episodes (seeds ``seed_start``...); each ends at success (coverage >
    0.95), after ``max_duration_s`` (30 s = Push-T's 300 steps at 10 Hz) or on E-STOP. Returns score, success
    rate, per-episode results and the loop metrics pooled over all ticks; writes ``deploy.json`` (and each
    episode's tick log) to ``output_dir``."""
    if loop.mode != loop_mode(executor):
        raise ValueError(f"executor={executor!r} needs loop mode {loop_mode(executor)!r}, got {loop.mode!r}")
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    episodes, lateness, inference = [], [], []
    with inference_for(checkpoint, executor, 1.0 / loop.policy_hz, **overrides) as provider:
        for i in tqdm(range(n_episodes), desc="deploy", unit="episode", disable=not progress):
            seed = seed_start + i
            video_path = out / f"episode_{seed}.mp4" if out is not None and video and i == 0 else None
            with SimPushTRobot(seed, physics_hz=physics_hz, video_path=video_path) as robot:
                control = ControlLoop(robot, provider, loop)
                summary = control.run(max_duration_s, stop_when=lambda obs: bool(obs.info.get("success")))
            info = summary["final_info"]
            episodes.append(
                {
                    "seed": seed,
                    "score": float(np.clip(info["max_coverage"] / SUCCESS_COVERAGE, 0.0, 1.0)),
                    "success": bool(info["success"]),
                    "ended_by": summary["ended_by"],
                    "duration_s": summary["ticks"] / loop.control_hz,
                    "summary": summary,
                }
            )
            lateness += [r.lateness_s for r in control.metrics.ticks]
            inference += control.metrics.inference_s
            if out is not None:
                control.metrics.write_json(out / f"ticks_{seed}.json")
    result = {
        "checkpoint": str(checkpoint),
        "executor": executor or provider.executor,
        "mode": loop.mode,
        "loop": {k: v for k, v in dataclasses.asdict(loop).items() if k != "limits"},
        "n_episodes": n_episodes,
        "score": float(np.mean([e["score"] for e in episodes])),
        "success_rate": float(np.mean([e["success"] for e in episodes])),
        "lateness_ms": percentiles_ms(lateness, (50.0, 99.0, 99.9)),
        "lateness_max_ms": float(max(lateness) * 1e3) if lateness else None,
        "missed_ticks": int(sum(e["summary"]["missed_ticks"] for e in episodes)),
        "inference_ms": percentiles_ms(inference, (50.0, 99.0)),
        "limit_events": {
            k: int(sum(e["summary"]["limit_events"][k] for e in episodes))
            for k in episodes[0]["summary"]["limit_events"]
        },
        "estops": sum(e["ended_by"].startswith("estop") for e in episodes),
        "episodes": episodes,
    }
    if out is not None:
        _write_json(out / "deploy.json", result)
    return result


def deploy_robot(
    checkpoint: str | Path,
    robot_factory: Callable[[], Robot],
    loop: LoopConfig,
    *,
    executor: str | None = None,
    max_duration_s: float = 60.0,
    output_dir: str | Path | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """One run on a robot (real hardware over ROS 2, or anything behind `Robot`) until ``max_duration_s`` or E-STOP;
    writes the tick log and the summary to ``output_dir``."""
    if loop.mode != loop_mode(executor):
        raise ValueError(f"executor={executor!r} needs loop mode {loop_mode(executor)!r}, got {loop.mode!r}")
    with inference_for(checkpoint, executor, 1.0 / loop.policy_hz, **overrides) as provider:
        robot = robot_factory()
        robot.start()
        try:
            control = ControlLoop(robot, provider, loop)
            summary = control.run(max_duration_s)
        finally:
            robot.close()
    if output_dir is not None:
        control.metrics.write_json(Path(output_dir) / "ticks.json")
    return summary


def pusht_limits(max_velocity: float = 1500.0) -> Limits:
    """Push-T's safety limits: the 512 x 512 px workspace and a target speed bound (px/s)."""
    return Limits(workspace_low=[0.0, 0.0], workspace_high=[WORKSPACE, WORKSPACE], max_velocity=max_velocity)
