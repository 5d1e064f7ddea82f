"""Run configurations for the CLI, registered in Hydra's ConfigStore so every YAML key is type-checked."""

from __future__ import annotations

import dataclasses
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from deploy.loop import LoopConfig
from envs.tasks import TaskConfig
from policies.registry import config_class, policy_names
from policies.train import TrainLoopConfig
from rl.methods import import_methods, method_config_class, method_names
from rl.run import AdaptLoopConfig


@dataclasses.dataclass
class TrainRunConfig:
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    policy: Any = MISSING
    train: TrainLoopConfig = dataclasses.field(default_factory=TrainLoopConfig)
    run_dir: str | None = None
    name: str | None = None
    logger: str = "wandb"
    resume: str | None = None
    video: bool = True

    def __post_init__(self) -> None:
        if self.logger not in ("wandb", "none"):
            raise ValueError(f"logger must be 'wandb' or 'none', got '{self.logger}'")


@dataclasses.dataclass
class EvalRunConfig:
    checkpoint: str = MISSING
    n_episodes: int = 50
    seed_start: int | None = None  # default: the checkpoint task's test seeds
    n_envs: int | None = None
    max_steps: int | None = None
    # Inference overrides, validated against the checkpoint's policy config.
    sampler: str | None = None
    num_inference_steps: int | None = None
    n_action_steps: int | None = None
    sample_latent: bool | None = None  # DSRL adapters: a fresh latent per chunk instead of the actor's mean
    executor: str | None = None  # one of envs.executor.EXECUTORS; default: the policy's own (Streaming DP: streaming)
    temporal_ensemble: float | None = None  # ACT's exponential weight k (chunk/ensemble executor, queried every step)
    # Executor options (make_executor validates them per kind); None = the executor's default.
    rti_steps: int | None = None  # rti: denoiser passes per refinement (default 3)
    rti_start: float | None = None  # rti: warm-start noise level in (0, 1] (default 0.2)
    rti_every: int | None = None  # rti: refine every k control steps (default 4)
    discrete_dims: list[int] | None = None  # action dims snapped at execution to the nearest of snap_values
    snap_values: list[float] | None = None
    output_dir: str | None = None  # default: <checkpoint>/eval
    video: bool = True
    seed: int | None = 0  # torch seeded before the rollouts (sampling noise): reruns repeat exactly; null: unseeded
    device: str = "cpu"
    backend: str = "torch"  # "onnx": the UNet through ONNX Runtime (policies.onnx_backend; the onnx extra)

    def __post_init__(self) -> None:
        if self.n_episodes < 1:
            raise ValueError(f"n_episodes must be >= 1, got {self.n_episodes}")


EXECUTOR_OPTIONS = ("rti_steps", "rti_start", "rti_every", "discrete_dims", "snap_values")


def executor_options(cfg: Any) -> dict[str, Any]:
    """The executor options set on the command line (eval or deploy)."""
    return {k: getattr(cfg, k) for k in EXECUTOR_OPTIONS if getattr(cfg, k) is not None}


# The loop's own dataclass minus `limits` (a union-typed object Hydra cannot hold; the robot config supplies it):
# generated from deploy.loop.LoopConfig so that the CLI never restates its fields and defaults.
LoopSettings = dataclasses.make_dataclass(
    "LoopSettings",
    [
        (f.name, f.type, dataclasses.field(default=f.default))
        for f in dataclasses.fields(LoopConfig)
        if f.name != "limits"
    ],
)


@dataclasses.dataclass
class SimPushTRobotConfig:
    """The simulated Push-T robot (deploy.sim_pusht), run in real time in its own process."""

    physics_hz: float = 100.0
    max_velocity: float = 1500.0  # px/s bound on the commanded target (the loop's velocity limit)


@dataclasses.dataclass
class DeployRunConfig:
    checkpoint: str = MISSING
    robot: Any = MISSING  # configs/robot/<name>.yaml: sim_pusht or ros2
    executor: str | None = None  # chunk, ensemble, rti, streaming (sync) or async; default: the policy's own
    loop: Any = dataclasses.field(default_factory=lambda: LoopSettings())
    # Inference overrides, validated against the checkpoint's config.
    sampler: str | None = None
    num_inference_steps: int | None = None
    temporal_ensemble: float | None = None
    rti_steps: int | None = None
    rti_start: float | None = None
    rti_every: int | None = None
    discrete_dims: list[int] | None = None
    snap_values: list[float] | None = None
    torch_threads: int = 1  # of the inference process
    backend: str = "torch"  # "onnx": the UNet through ONNX Runtime in the inference process (the onnx extra)
    # sim_pusht: episodes on the test seeds; ros2: one run of max_duration_s.
    n_episodes: int = 1
    seed_start: int = 100000
    max_duration_s: float = 30.0  # Push-T: 300 steps at 10 Hz
    output_dir: str | None = None  # default: <checkpoint>/deploy
    video: bool = True

    def __post_init__(self) -> None:
        if self.n_episodes < 1:
            raise ValueError(f"n_episodes must be >= 1, got {self.n_episodes}")
        if not self.max_duration_s > 0:
            raise ValueError(f"max_duration_s must be > 0, got {self.max_duration_s}")


@dataclasses.dataclass
class AdaptRunConfig:
    base: str = MISSING  # the base policy's checkpoint directory (frozen during adaptation)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    rl: Any = MISSING  # configs/rl/<method>.yaml, chosen with method=<name>
    loop: AdaptLoopConfig = dataclasses.field(default_factory=AdaptLoopConfig)
    run_dir: str | None = None
    name: str | None = None
    logger: str = "wandb"
    resume: str | None = None  # a run directory of `robodiff adapt`
    device: str = "cpu"
    video: bool = False  # rollout videos of the evaluations
    threads: int = 0  # torch intra-op threads; 0: every available core (1 is faster when other jobs share the CPU)

    def __post_init__(self) -> None:
        if self.logger not in ("wandb", "none"):
            raise ValueError(f"logger must be 'wandb' or 'none', got '{self.logger}'")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: all available cores), got {self.threads}")


@dataclasses.dataclass
class ComposeSearchConfig:
    seeds: str = "0:50"  # validation seeds "start:stop" (Push-T training-range seeds; disjoint from eval.seeds)
    step: float = 0.1  # two parents: the weight grid 0, 0.1, ..., 1
    coarse_step: float = 0.25  # three or more: the first simplex lattice, then refined
    rounds: int = 2  # refinements (halving the step around the best point)
    scales: list[float] | None = None  # operator=product: total weights to try, the grid run as s * w for each s
    noise_seeds: int = 1  # rollouts per candidate, sampling noise seeded noise_seed, noise_seed + 1, ...
    endpoints: bool = True  # false: only weights giving every parent a share (a product end point: A x A)


@dataclasses.dataclass
class ComposeEvalConfig:
    seeds: str = "100000:100050"  # held-out seeds for the report (Diffusion Policy's Push-T test seeds)
    noise_seeds: int = 1  # held-out rollouts per policy, averaged (different sampling-noise seeds)


@dataclasses.dataclass
class ComposeRunConfig:
    parents: list[str] = MISSING  # parent checkpoint directories
    weights: list[float] | None = None  # given: no search, report these
    operator: str = "convex"  # convex | product | mixture (deploy.compose)
    search: ComposeSearchConfig = dataclasses.field(default_factory=ComposeSearchConfig)
    eval: ComposeEvalConfig = dataclasses.field(default_factory=ComposeEvalConfig)
    sampler: str | None = None  # None: parent 0's
    num_inference_steps: int | None = None  # None: parent 0's
    n_action_steps: int | None = None  # None: parent 0's
    n_envs: int | None = None  # simulator processes per evaluation (None: min(episodes, 25))
    max_steps: int = 300
    latency_reps: int = 20  # chunk-latency measurement: timed calls per policy (batch 1)
    noise_seed: int = 0  # torch is seeded with it before every rollout: the same noise draws for every candidate
    run_dir: str | None = None
    name: str | None = None
    device: str = "cpu"
    threads: int = 0  # torch threads; 0: all available cores

    def __post_init__(self) -> None:
        if len(self.parents) < 2:
            raise ValueError(f"parents must list at least 2 checkpoints, got {list(self.parents)}")
        if self.threads < 0 or self.latency_reps < 1 or self.max_steps < 1:
            raise ValueError("threads must be >= 0, latency_reps >= 1 and max_steps >= 1")
        if self.search.noise_seeds < 1 or self.eval.noise_seeds < 1:
            raise ValueError("search.noise_seeds and eval.noise_seeds must be >= 1")


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainRunConfig)
    cs.store(name="eval_schema", node=EvalRunConfig)
    cs.store(name="deploy_schema", node=DeployRunConfig)
    cs.store(group="robot", name="sim_pusht_robot_schema", node=SimPushTRobotConfig)
    try:  # the ROS 2 robot needs the `ros2` extra (cyclonedds) only when it is used
        from deploy.ros2.robot import Ros2RobotConfig
    except ImportError:
        pass
    else:
        cs.store(group="robot", name="ros2_robot_schema", node=Ros2RobotConfig)
    cs.store(group="task", name="task_schema", node=TaskConfig)
    cs.store(group="train", name="train_loop_schema", node=TrainLoopConfig)
    for name in policy_names():
        cs.store(group="policy", name=f"{name}_schema", node=config_class(name))
    cs.store(name="adapt_schema", node=AdaptRunConfig)
    cs.store(name="compose_schema", node=ComposeRunConfig)
    cs.store(group="loop", name="adapt_loop_schema", node=AdaptLoopConfig)
    import_methods()
    for name in method_names():
        cs.store(group="rl", name=f"{name}_schema", node=method_config_class(name))
