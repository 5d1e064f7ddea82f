"""``robodiff`` console script: ``train``, ``eval``, ``deploy``, ``adapt``, ``compose``, ``list`` and ``data``.

Arguments after the command are Hydra overrides (``task=pusht_state train.steps=1500``), composed with Hydra's
compose API and converted once into the typed dataclasses of ``cli.config``; modules below never see a
DictConfig. A mistyped key or a bad value exits with status 2 and a message naming it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

USAGE = """usage: robodiff <command> [key=value ...]

commands:
  train   train a policy:     robodiff train task=pusht_state policy=diffusion_unet train.steps=1500 logger=none
  eval    evaluate a policy:  robodiff eval checkpoint=<run_dir>/checkpoints/latest n_episodes=50
  deploy  run a policy in the real-time control loop:
          robodiff deploy checkpoint=<dir> robot=sim_pusht executor=rti n_episodes=5
  adapt   adapt a frozen policy by RL:
          robodiff adapt method=dsrl base=<checkpoint> task=pusht_state loop.total_env_steps=100000
  compose compose trained policies at test time (weights searched on validation seeds):
          robodiff compose parents=[<ckpt>,<ckpt>] search.seeds=0:50 eval.seeds=100000:100050
  list    show registered tasks, policies, executors and RL methods
  data    inspect, convert or generate datasets (zarr, LeRobot v3, robomimic HDF5, ROS bags):
          robodiff data info <path>
          robodiff data convert from=<path> to=<path> [from_format=...] [to_format=...] [fps=10 ...]
          robodiff data generate task=<task> n_episodes=N out=<path> [seed=0] [action_noise=0.0]
"""


class UsageError(Exception):
    """A user mistake on the command line; printed without a traceback, exit status 2."""


def compose(config_name: str, overrides: Sequence[str]) -> Any:
    """Compose ``configs/<config_name>.yaml`` with overrides and return the typed dataclass."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from cli.config import register_configs

    register_configs()
    adding = [o for o in overrides if o.startswith(("+", "~"))]
    if adding:
        # Hydra's "+key=" opens the struct flag and would smuggle unknown fields into the typed config.
        raise UsageError(
            f"{adding[0]}: adding or deleting keys is not allowed; every setting already exists "
            "with a default (see configs/)"
        )
    try:
        with initialize_config_module(config_module="configs", version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        return OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        # Hydra wraps the precise OmegaConf error ("Key 'foo' not in 'DiffusionUnetConfig'"): show both.
        lines = [str(err).strip().splitlines()[0]]
        if err.__cause__ is not None:
            lines += [ln.strip() for ln in str(err.__cause__).strip().splitlines()[:2]]
        elif isinstance(err, HydraException):
            lines = [ln for ln in str(err).strip().splitlines() if ln.strip()][:6]
        raise UsageError(" | ".join(lines)) from err


def _jsonable(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


class MetricsLogger:
    """Appends every record to ``metrics.jsonl``; mirrors it to wandb (offline by default) when enabled."""

    def __init__(self, run_dir: Path, kind: str, config: dict, name: str, resume: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        if kind == "wandb":
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project="robodiff",
                name=name,
                dir=str(run_dir),
                config=config,
                resume="allow" if resume else None,
                id=run_dir.name.replace("/", "-"),
            )

    def __call__(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _resolve_resume(resume: str) -> tuple[Path, Path]:
    """``resume`` names a run directory or its ``checkpoints/latest``; returns (run_dir, checkpoint_dir)."""
    path = Path(resume).expanduser()
    ckpt = path / "checkpoints" / "latest" if (path / "checkpoints").is_dir() else path
    if not (ckpt / "train_state.json").exists():
        raise UsageError(f"resume={resume}: no resumable checkpoint (expected {ckpt}/train_state.json)")
    return ckpt.parent.parent, ckpt


def _prepare_run_dir(cfg: Any, kind: str, resume_dir: Path | None, saved: list[str], overrides: Sequence[str]) -> Path:
    """The run directory (``cfg.run_dir``, else ``runs/<date>/<time>_<kind>``; a resumed run's own), created, with the
    overrides that made it saved for ``resume=``; refuses to start a new run over an existing one."""
    if resume_dir is None:
        stamp = dt.datetime.now()
        name = cfg.name or f"{stamp:%H%M%S}_{kind}"
        run_dir = Path(cfg.run_dir) if cfg.run_dir else Path("runs") / f"{stamp:%Y-%m-%d}" / name
        if (run_dir / "checkpoints" / "latest").exists():
            raise UsageError(f"{run_dir} already holds a run; resume it with resume={run_dir} or pick another run_dir")
    else:
        run_dir = resume_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "overrides.json").write_text(json.dumps(saved or [o for o in overrides if not o.startswith("resume=")]))
    return run_dir


def cmd_train(overrides: Sequence[str]) -> dict:
    import torch

    from envs.tasks import make_task
    from policies import distributed
    from policies.registry import make_policy
    from policies.train import Trainer, available_cores, seed_everything

    resume_arg = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), None)
    saved: list[str] = []
    if resume_arg:
        run_dir, ckpt = _resolve_resume(resume_arg)
        saved = json.loads((run_dir / "overrides.json").read_text())
    cfg = compose("train", [o for o in saved if not o.startswith(("resume=", "run_dir="))] + list(overrides))
    try:  # under torchrun: join the process group (a no-op otherwise); rank 0 alone writes and logs
        distributed.init_process_group(cfg.train.device, cfg.train.dist_timeout_s)
    except ValueError as err:
        raise UsageError(str(err)) from err
    is_main = distributed.rank() == 0
    resume_dir = run_dir if resume_arg else None
    run_dir = distributed.run_on_rank0(
        lambda: _prepare_run_dir(cfg, f"{cfg.task.name}_{cfg.policy.type}", resume_dir, saved, overrides)
    )
    resolved = {
        "task": _jsonable(cfg.task),
        "policy_type": cfg.policy.type,
        "policy": _jsonable(cfg.policy),
        "train": _jsonable(cfg.train),
    }
    if is_main:
        (run_dir / "config.json").write_text(json.dumps(resolved, indent=2))

    # processes started by torchrun on one machine share its cores
    torch.set_num_threads(cfg.train.num_threads or max(1, available_cores() // distributed.local_world_size()))
    seed_everything(cfg.train.seed)
    task = make_task(cfg.task)
    p = cfg.policy
    train_set, val_set = task.datasets(p.horizon, p.n_obs_steps, p.n_action_steps, p.needs_transitions)
    policy = make_policy(p, task.shape_meta)
    policy.fit_normalizer(train_set.normalizer_data())
    video_dir = run_dir / "videos"

    def eval_fn(model, step: int, final: bool) -> dict:
        result = task.evaluate(
            model,
            n_obs_steps=p.n_obs_steps,
            n_action_steps=p.n_action_steps,
            n_episodes=cfg.task.eval_episodes if final else cfg.train.eval_episodes,
            video_path=video_dir / f"step_{step:07d}.mp4" if cfg.video else None,
            device=cfg.train.device,
        )
        return {k: v for k, v in result.to_dict().items() if not isinstance(v, list)}

    n_params = sum(x.numel() for x in policy.parameters())
    if is_main:
        print(
            f"run_dir: {run_dir}\npolicy: {p.type} ({n_params / 1e6:.2f} M parameters), task: {cfg.task.name}, "
            f"{len(train_set)} training windows, {len(val_set)} validation windows, "
            f"{distributed.world_size()} process(es)",
            flush=True,
        )
    logger = MetricsLogger(run_dir, cfg.logger, resolved, run_dir.name, bool(resume_arg)) if is_main else None
    try:
        try:
            trainer = Trainer(
                policy,
                train_set,
                cfg.train,
                run_dir,
                val_set=val_set,
                eval_fn=eval_fn,
                checkpoint_extra={"task": resolved["task"], "train": resolved["train"]},
                log_fn=logger,
            )
        except ValueError as err:  # a batch size that the data or the processes cannot provide
            raise UsageError(str(err)) from err
        if resume_arg:
            trainer.resume(ckpt)
            if is_main:
                print(f"resumed from {ckpt} at step {trainer.step}", flush=True)
        summary = trainer.fit()
    finally:
        if logger is not None:
            logger.close()
        distributed.destroy_process_group()
    final = summary.pop("final_eval") or {}
    return {
        "run_dir": str(run_dir),
        **summary,
        **{k: final[k] for k in ("score", "success_rate", "n_episodes") if k in final},
    }


def cmd_eval(overrides: Sequence[str]) -> dict:
    import torch

    from cli.config import executor_options
    from envs.tasks import TaskConfig, make_task
    from policies.checkpoint import load_policy, read_config
    from policies.onnx_backend import check_backend, use_onnx
    from policies.train import available_cores

    cfg = compose("eval", overrides)
    ckpt = Path(cfg.checkpoint).expanduser()
    try:
        saved = read_config(ckpt)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from err
    inference = {
        k: getattr(cfg, k)
        for k in ("sampler", "num_inference_steps", "n_action_steps", "sample_latent")
        if getattr(cfg, k) is not None
    }
    torch.set_num_threads(available_cores())
    try:
        policy = load_policy(ckpt, device=cfg.device, **inference)
        if check_backend(cfg.backend) == "onnx":
            use_onnx(policy)
    except (ImportError, ValueError) as err:
        raise UsageError(f"cannot load {ckpt}: {err}") from err
    task_values = dict(saved.get("task") or {"name": "pusht_state"})
    for key, field in (("seed_start", "eval_seed_start"), ("n_envs", "n_envs"), ("max_steps", "max_steps")):
        if getattr(cfg, key) is not None:
            task_values[field] = getattr(cfg, key)
    task = make_task(TaskConfig(**task_values))
    out = Path(cfg.output_dir) if cfg.output_dir else ckpt / "eval"
    out.mkdir(parents=True, exist_ok=True)
    pc = policy.config
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    try:
        result = task.evaluate(
            policy,
            n_obs_steps=pc.n_obs_steps,
            n_action_steps=pc.n_action_steps,
            n_episodes=cfg.n_episodes,
            video_path=out / "rollout.mp4" if cfg.video else None,
            device=cfg.device,
            executor=cfg.executor,
            temporal_ensemble=cfg.temporal_ensemble,
            executor_options=executor_options(cfg),
        )
    except ValueError as err:  # an executor that does not fit the policy, an unknown option
        raise UsageError(str(err)) from err
    record = {"checkpoint": str(ckpt), "seed": cfg.seed, **result.to_dict()}
    (out / "eval.json").write_text(json.dumps(record, indent=2))
    print(
        f"{record['n_episodes']} episodes: score {record['score']:.3f}, success {record['success_rate']:.2%} "
        f"-> {out / 'eval.json'}",
        flush=True,
    )
    return {k: v for k, v in record.items() if not isinstance(v, list)}


def cmd_deploy(overrides: Sequence[str]) -> dict:
    from cli.config import SimPushTRobotConfig, executor_options
    from deploy.loop import LoopConfig
    from deploy.run import DEPLOY_EXECUTORS, deploy_robot, deploy_sim_pusht, loop_mode, pusht_limits
    from deploy.safety import Limits
    from policies.checkpoint import read_config

    if "robot=ros2" in overrides:
        try:
            import deploy.ros2.robot  # noqa: F401
        except ImportError as err:
            raise UsageError(f"robot=ros2 needs the ros2 extra (pip install -e '.[ros2]'): {err}") from err
    cfg = compose("deploy", overrides)
    ckpt = Path(cfg.checkpoint).expanduser()
    try:
        saved = read_config(ckpt)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from err
    if cfg.executor is not None and cfg.executor not in DEPLOY_EXECUTORS:
        raise UsageError(f"executor must be one of {DEPLOY_EXECUTORS}, got {cfg.executor!r}")
    inference = {k: getattr(cfg, k) for k in ("sampler", "num_inference_steps") if getattr(cfg, k) is not None}
    inference |= executor_options(cfg)
    if cfg.temporal_ensemble is not None:
        inference["temporal_ensemble"] = cfg.temporal_ensemble
    if cfg.backend != "torch":
        inference["backend"] = cfg.backend
    loop_values = {**dataclasses.asdict(cfg.loop), "mode": loop_mode(cfg.executor)}
    out = Path(cfg.output_dir) if cfg.output_dir else ckpt / "deploy"
    robot = cfg.robot
    try:
        if isinstance(robot, SimPushTRobotConfig):
            if saved["shape_meta"]["obs"].keys() != {"state"}:
                raise UsageError("robot=sim_pusht runs state-observation Push-T checkpoints (obs 'state' [20])")
            loop = LoopConfig(**loop_values, limits=pusht_limits(robot.max_velocity))
            result = deploy_sim_pusht(
                ckpt,
                loop,
                executor=cfg.executor,
                n_episodes=cfg.n_episodes,
                seed_start=cfg.seed_start,
                max_duration_s=cfg.max_duration_s,
                output_dir=out,
                video=cfg.video,
                physics_hz=robot.physics_hz,
                torch_threads=cfg.torch_threads,
                **inference,
            )
            print(
                f"{result['n_episodes']} real-time episodes: score {result['score']:.3f}, success "
                f"{result['success_rate']:.0%}, lateness p99 {result['lateness_ms']['p99']:.2f} ms, "
                f"missed ticks {result['missed_ticks']} -> {out / 'deploy.json'}",
                flush=True,
            )
            return {k: v for k, v in result.items() if k not in ("episodes", "loop")}
        from deploy.ros2.robot import Ros2Robot

        limits = Limits(low=robot.position_low, high=robot.position_high, max_velocity=robot.max_velocity)
        loop = LoopConfig(**loop_values, limits=limits)
        summary = deploy_robot(
            ckpt,
            lambda: Ros2Robot(robot),
            loop,
            executor=cfg.executor,
            max_duration_s=cfg.max_duration_s,
            output_dir=out,
            torch_threads=cfg.torch_threads,
            **inference,
        )
        return summary
    except ValueError as err:  # bad loop settings, overrides or executor options: named by the component
        raise UsageError(str(err)) from err


def cmd_adapt(overrides: Sequence[str]) -> dict:
    import torch

    from policies.checkpoint import read_config
    from policies.train import available_cores
    from rl.run import adapt, check_base

    # `method=dsrl` picks the config group configs/rl/ (Hydra's group is named after the directory).
    overrides = [f"rl={o.split('=', 1)[1]}" if o.startswith("method=") else o for o in overrides]
    resume_arg = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), None)
    saved: list[str] = []
    if resume_arg:
        run_dir = Path(resume_arg).expanduser()
        if not (run_dir / "overrides.json").exists():
            raise UsageError(f"resume={resume_arg}: not a run directory of robodiff adapt (no overrides.json)")
        saved = json.loads((run_dir / "overrides.json").read_text())
    cfg = compose("adapt", [o for o in saved if not o.startswith(("resume=", "run_dir="))] + list(overrides))
    base = Path(cfg.base).expanduser()
    try:
        base_config = read_config(base)
        from envs.tasks import make_task

        check_base(base_config, make_task(cfg.task).shape_meta, base, cfg.task.name)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"base={cfg.base}: {err}") from err
    run_dir = _prepare_run_dir(cfg, f"adapt_{cfg.rl.type}", run_dir if resume_arg else None, saved, overrides)
    resolved = {
        "base": str(base),
        "task": _jsonable(cfg.task),
        "method": cfg.rl.type,
        "rl": _jsonable(cfg.rl),
        "loop": _jsonable(cfg.loop),
    }
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2))
    torch.set_num_threads(cfg.threads or available_cores())
    print(f"run_dir: {run_dir}\nmethod: {cfg.rl.type}, base: {base}, task: {cfg.task.name}", flush=True)
    logger = MetricsLogger(run_dir, cfg.logger, resolved, run_dir.name, bool(resume_arg))
    try:
        summary = adapt(
            cfg.rl,
            base,
            run_dir,
            cfg.loop,
            cfg.task,
            log=logger,
            resume=bool(resume_arg),
            device=cfg.device,
            video=cfg.video,
        )
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from err
    finally:
        logger.close()
    print(
        f"{summary['method']}: {summary['env_steps']} env steps, success {summary['base_success_rate']:.0%} (base) -> "
        f"{summary['success_rate']:.0%}, score {summary['base_score']:.3f} -> {summary['score']:.3f}",
        flush=True,
    )
    return summary


def _run_name(path: Path) -> str:
    in_run = path.name in ("latest", "best") and path.parent.name == "checkpoints"
    return path.parent.parent.name if in_run else path.name


def chunk_latency(policy: Any, obs: dict, reps: int) -> float:
    """Median seconds per ``predict_action_chunk`` call on ``obs`` (after one warm-up call)."""
    import time

    import numpy as np

    policy.predict_action_chunk(obs)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        policy.predict_action_chunk(obs)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def cmd_compose(overrides: Sequence[str]) -> dict:
    import torch

    from deploy.compose import load_parents
    from deploy.weight_search import (
        compose_and_search,
        format_table,
        parse_seeds,
        plot_search,
        repeated,
        save_search,
    )
    from envs.evaluate import evaluate
    from envs.pusht import obs_mode_for
    from policies.checkpoint import save_checkpoint
    from policies.train import available_cores

    cfg = compose("compose", overrides)
    torch.set_num_threads(cfg.threads or available_cores())
    try:
        search_seeds = parse_seeds(cfg.search.seeds, "search.seeds")
        eval_seeds = parse_seeds(cfg.eval.seeds, "eval.seeds")
        parents = load_parents([str(Path(p).expanduser()) for p in cfg.parents], device=cfg.device)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from err
    # "0:base", "1:parent_b": a checkpoints/latest directory is named by its run
    names = [f"{i}:{_run_name(Path(p))}" for i, p in enumerate(cfg.parents)]
    run_dir = _prepare_run_dir(cfg, "compose", None, [], overrides)

    def rollout(policy: Any, seeds: range) -> Any:
        return evaluate(
            policy,
            obs_mode=obs_mode_for(policy.shape_meta["obs"]),
            n_episodes=len(seeds),
            seed_start=seeds.start,
            n_envs=cfg.n_envs,
            max_steps=cfg.max_steps,
            n_obs_steps=policy.config.n_obs_steps,
            n_action_steps=policy.config.n_action_steps,
            progress=False,
            device=cfg.device,
        )

    def noise_seeds(n: int) -> list[int]:
        return list(range(cfg.noise_seed, cfg.noise_seed + n))

    def save(search: Any) -> None:
        save_search(search, run_dir / "search.json")
        plot_search(search, run_dir / "weight_curve.png", names, f"composition of {' + '.join(names)}")
        print(format_table(search, names), flush=True)

    print(f"run_dir: {run_dir}\nparents: {list(cfg.parents)}", flush=True)
    try:
        composed, _, report = compose_and_search(
            parents,
            repeated(rollout, noise_seeds(cfg.search.noise_seeds), torch.manual_seed),
            search_seeds,
            eval_seeds,
            weights=cfg.weights,
            operator=cfg.operator,
            step=cfg.search.step,
            coarse_step=cfg.search.coarse_step,
            rounds=cfg.search.rounds,
            scales=cfg.search.scales,
            endpoints=cfg.search.endpoints,
            sampler=cfg.sampler,
            num_inference_steps=cfg.num_inference_steps,
            n_action_steps=cfg.n_action_steps,
            eval_rollout=repeated(rollout, noise_seeds(cfg.eval.noise_seeds), torch.manual_seed),
            on_search=save,
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
    obs = {k: torch.rand(1, composed.config.n_obs_steps, *shape) for k, shape in composed.shape_meta["obs"].items()}
    obs = {k: v * 512 if len(v.shape) == 3 else v for k, v in obs.items()}  # low-dim keys in pixels, images [0, 1]
    parent_s = [chunk_latency(p, {k: obs[k] for k in p.shape_meta["obs"]}, cfg.latency_reps) for p in parents]
    composed_s = chunk_latency(composed, obs, cfg.latency_reps)
    report["latency_per_chunk_s"] = {"parents": parent_s, "composed": composed_s}
    report["parents_checkpoints"] = [str(p) for p in cfg.parents]
    task = {"name": f"pusht_{obs_mode_for(composed.shape_meta['obs'])}", "max_steps": cfg.max_steps}
    save_checkpoint(composed, run_dir / "checkpoint", extra_config={"task": task})
    report["checkpoint"] = str(run_dir / "checkpoint")
    (run_dir / "summary.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"held-out seeds {eval_seeds.start}:{eval_seeds.stop} ({len(eval_seeds)} episodes, mean over "
        f"{cfg.eval.noise_seeds} sampling-noise seed(s)):"
    ]
    for name, r, t in zip(names, report["parents"], parent_s, strict=True):
        lines.append(
            f"  parent {name}: score {r['score']:.3f}, success {r['success_rate']:.0%}, {t * 1e3:.1f} ms/chunk"
        )
    c = report["composed"]
    lines.append(
        f"  composed {report['operator']} w={[round(w, 3) for w in report['weights']]}: score {c['score']:.3f}, "
        f"success {c['success_rate']:.0%}, {composed_s * 1e3:.1f} ms/chunk "
        f"({report['composed_minus_best_parent']:+.3f} vs the better parent)"
    )
    print("\n".join(lines), flush=True)
    return {"run_dir": str(run_dir), **report}


def cmd_list(_: Sequence[str]) -> dict:
    from deploy.run import DEPLOY_EXECUTORS
    from envs.tasks import task_names
    from policies.registry import plugin_names, policy_names
    from rl.methods import import_methods, method_names

    import_methods()
    listing = {
        "tasks": task_names(),
        "policies": sorted(set(policy_names()) | set(plugin_names())),  # adapters (residual, dsrl) are plugins
        "executors": list(DEPLOY_EXECUTORS),
        "rl methods": method_names(),
    }
    for kind, names in listing.items():
        print(f"{kind}:\n" + "".join(f"  {n}\n" for n in names), end="")
    return listing


def cmd_data(args: Sequence[str]) -> dict:
    from cli.data_cmd import cmd_data as run_data

    try:
        return run_data(args)
    except ValueError as err:  # a bad path, format, option or dataset, named by data.formats / data.lerobot
        raise UsageError(str(err)) from err


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "deploy": cmd_deploy,
    "adapt": cmd_adapt,
    "compose": cmd_compose,
    "list": cmd_list,
    "data": cmd_data,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, overrides = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"robodiff: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        return 2
    bad = [o for o in overrides if "=" not in o and command != "data"]  # data takes a subcommand and a path
    if bad:
        print(f"robodiff {command}: arguments must be key=value overrides, got {bad}", file=sys.stderr)
        return 2
    if command != "data":  # data commands compose no policy config; they skip loading torch and the policies
        import policies  # noqa: F401  (registers the policies before configs are composed)

    try:
        result = COMMANDS[command](overrides)
    except UsageError as err:
        print(f"robodiff {command}: {err}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
