"""Run configurations for the CLI, registered in Hydra's ConfigStore so every YAML key is type-checked."""

from __future__ import annotations

import dataclasses
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from envs.tasks import TaskConfig
from policies.registry import config_class, policy_names
from policies.train import TrainLoopConfig


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
    executor: str | None = None  # "chunk" or "streaming"; default: the policy's own (streaming for Streaming DP)
    temporal_ensemble: float | None = None  # ACT's exponential weight k (chunk executor, queried every step)
    output_dir: str | None = None  # default: <checkpoint>/eval
    video: bool = True
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.n_episodes < 1:
            raise ValueError(f"n_episodes must be >= 1, got {self.n_episodes}")


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainRunConfig)
    cs.store(name="eval_schema", node=EvalRunConfig)
    cs.store(group="task", name="task_schema", node=TaskConfig)
    cs.store(group="train", name="train_loop_schema", node=TrainLoopConfig)
    for name in policy_names():
        cs.store(group="policy", name=f"{name}_schema", node=config_class(name))
