"""Task registry: a task binds a demonstration dataset to the simulator and evaluation protocol it came from.

``register_task("pusht_state", factory)``; ``make_task(TaskConfig)`` builds by ``config.name``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from data.pusht import make_pusht_datasets, shape_meta
from data.sequence import SequenceDataset


@dataclasses.dataclass
class TaskConfig:
    name: str = "pusht_state"
    dataset_path: str | None = None  # None: $ROBODIFF_DATA, then ../shared/data beside the repository
    val_ratio: float = 0.02
    max_train_episodes: int | None = None  # Diffusion Policy's paper setting is 90
    # [start, stop): train only on episodes with these indices (validation episodes stay excluded), e.g. two
    # parents for composition on disjoint halves of the data
    train_episodes: list[int] | None = None
    # "train": normalizer statistics from the training episodes; "all": from every episode in the file, so that
    # policies trained on different subsets share one action normalization (composition requires it)
    normalizer_episodes: str = "train"
    split_seed: int = 42
    # MetaWorld: observe a rendered RGB image of this many pixels square + the hand (agent_pos) instead of the
    # 39-number state (needs an OpenGL backend for MuJoCo: MUJOCO_GL=osmesa or egl); None: state observations
    image_size: int | None = None
    eval_seed_start: int = 100000  # Diffusion Policy's Push-T test seeds are 100000..100049
    eval_episodes: int = 50
    max_steps: int = 300
    n_envs: int | None = None  # None: min(episodes, 25) simulator processes, batched through one policy call

    def __post_init__(self) -> None:
        if self.eval_episodes < 1:
            raise ValueError(f"task.eval_episodes must be >= 1, got {self.eval_episodes}")
        if self.max_steps < 1:
            raise ValueError(f"task.max_steps must be >= 1, got {self.max_steps}")
        if self.normalizer_episodes not in ("train", "all"):
            raise ValueError(f"task.normalizer_episodes must be 'train' or 'all', got {self.normalizer_episodes!r}")

    @property
    def train_range(self) -> tuple[int, int] | None:
        return None if self.train_episodes is None else tuple(self.train_episodes)  # type: ignore[return-value]


def dataset_path(config: TaskConfig, *default: str) -> Path:
    """Where a task's demonstrations live: ``config.dataset_path``, else the home of generated data,
    ``$ROBODIFF_DATA/<default...>``, else ``runs/data/<default...>`` in the repository (git-ignored)."""
    if config.dataset_path:
        return Path(config.dataset_path).expanduser()
    root = os.environ.get("ROBODIFF_DATA")
    base = Path(root).expanduser() if root else Path(__file__).resolve().parents[1] / "runs" / "data"
    return base.joinpath(*default)


class Task(Protocol):
    config: TaskConfig
    shape_meta: dict

    def datasets(
        self, horizon: int, n_obs_steps: int, n_action_steps: int, transitions: bool = False
    ) -> tuple[SequenceDataset, SequenceDataset]:
        """Train/validation windows; ``transitions`` adds ``reward``, ``terminal``, ``next_obs`` (offline RL)."""
        ...

    def evaluate(
        self,
        policy: Any,
        *,
        n_obs_steps: int,
        n_action_steps: int,
        n_episodes: int | None = None,
        video_path: str | Path | None = None,
        progress: bool = True,
        **kwargs: Any,
    ) -> Any: ...


_TASKS: dict[str, Callable[[TaskConfig], Task]] = {}


def register_task(name: str, factory: Callable[[TaskConfig], Task]) -> None:
    if name in _TASKS:
        raise ValueError(f"task '{name}' is already registered")
    _TASKS[name] = factory


def task_names() -> list[str]:
    return sorted(_TASKS)


def make_task(config: TaskConfig) -> Task:
    if config.name not in _TASKS:
        raise ValueError(f"unknown task '{config.name}'; registered tasks: {task_names()}")
    return _TASKS[config.name](config)


class PushTTask:
    """Push-T with Diffusion Policy's data and evaluation protocol, in ``state`` or ``image`` observation mode."""

    def __init__(self, config: TaskConfig, obs_mode: str) -> None:
        self.config, self.obs_mode = config, obs_mode
        self.shape_meta = shape_meta(obs_mode)

    def datasets(
        self, horizon: int, n_obs_steps: int, n_action_steps: int, transitions: bool = False
    ) -> tuple[SequenceDataset, SequenceDataset]:
        from envs.pusht import coverage, reward_from_coverage  # the simulator's packages load only when needed

        c = self.config
        return make_pusht_datasets(
            c.dataset_path,
            self.obs_mode,
            horizon=horizon,
            n_obs_steps=n_obs_steps,
            n_action_steps=n_action_steps,
            val_ratio=c.val_ratio,
            seed=c.split_seed,
            max_train_episodes=c.max_train_episodes,
            train_range=c.train_range,
            normalize_all=c.normalizer_episodes == "all",
            # The environment's own reward (goal coverage) of each recorded state: offline RL on the demonstrations
            # then optimises exactly what evaluation scores.
            reward_fn=(lambda state: reward_from_coverage(coverage(state))) if transitions else None,
        )

    def evaluate(
        self,
        policy: Any,
        *,
        n_obs_steps: int,
        n_action_steps: int,
        n_episodes: int | None = None,
        video_path: str | Path | None = None,
        progress: bool = True,
        **kwargs: Any,
    ) -> Any:
        from envs.evaluate import evaluate  # imports gymnasium's vector machinery only when evaluating

        c = self.config
        return evaluate(
            policy,
            obs_mode=self.obs_mode,
            n_episodes=n_episodes or c.eval_episodes,
            seed_start=c.eval_seed_start,
            n_envs=c.n_envs,
            max_steps=c.max_steps,
            n_obs_steps=n_obs_steps,
            n_action_steps=n_action_steps,
            video_path=video_path,
            progress=progress,
            **kwargs,
        )


class PushTStateImageTask(PushTTask):
    """Push-T observed through both the keypoint state and the camera: for evaluating a test-time composition of a
    state policy and an image policy (``deploy.compose``); no policy is trained on it."""

    def __init__(self, config: TaskConfig) -> None:
        self.config, self.obs_mode = config, "state_image"
        state, image = shape_meta("state"), shape_meta("image")
        self.shape_meta = {"obs": {**state["obs"], **image["obs"]}, "action": state["action"]}

    def datasets(self, *args: Any, **kwargs: Any) -> tuple[SequenceDataset, SequenceDataset]:
        raise ValueError(
            "pusht_state_image only evaluates compositions of state and image policies; train on pusht_state or "
            "pusht_image"
        )


register_task("pusht_state", lambda cfg: PushTTask(cfg, "state"))
register_task("pusht_image", lambda cfg: PushTTask(cfg, "image"))
register_task("pusht_state_image", PushTStateImageTask)


# MetaWorld v3 (envs/metaworld.py): metaworld/<env> for each of its 50 envs and metaworld/mt10. The package loads only
# when such a task is built; tests/test_metaworld.py checks this list against metaworld.env_dict.ALL_V3_ENVIRONMENTS.
METAWORLD_TASKS = tuple(
    f"{name}-v3"
    for name in """assembly basketball bin-picking box-close button-press-topdown button-press-topdown-wall button-press
    button-press-wall coffee-button coffee-pull coffee-push dial-turn disassemble door-close door-lock door-open
    door-unlock hand-insert drawer-close drawer-open faucet-open faucet-close hammer handle-press-side handle-press
    handle-pull-side handle-pull lever-pull pick-place-wall pick-out-of-hole pick-place plate-slide plate-slide-side
    plate-slide-back plate-slide-back-side peg-insert-side peg-unplug-side soccer stick-push stick-pull push push-wall
    push-back reach reach-wall shelf-place sweep-into sweep window-open window-close""".split()  # noqa: SIM905 (compact)
)


def _metaworld_task(config: TaskConfig) -> Task:
    from envs.metaworld import MetaWorldTask

    return MetaWorldTask(config)


for _name in (*METAWORLD_TASKS, "mt10"):
    register_task(f"metaworld/{_name}", _metaworld_task)


def _robosuite_task(task: str) -> Callable[[TaskConfig], Task]:
    def factory(config: TaskConfig) -> Task:
        from envs.robosuite import RobosuiteTask  # robosuite loads only when its task is built

        return RobosuiteTask(config, task)

    return factory


register_task("robosuite/lift", _robosuite_task("lift"))
register_task("robosuite/can", _robosuite_task("can"))
