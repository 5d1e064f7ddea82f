"""RL method registry and the interface every method implements.

``@register_method("dsrl")`` on a method's config dataclass (like ``register_policy``); ``config.build(base, loop,
context)`` returns a ``Method``. A method owns its adapter (``self.adapter``, a ``policies.base.Policy`` that
``evaluate`` and deployment run unchanged), its critics, targets and optimizers; ``rl.run.adapt`` owns the outer loop
(evaluations at environment-step milestones, checkpoints, resume, logs), and ``rl.env_loop.EnvLoop`` the environment.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from importlib import import_module
from typing import Any, ClassVar, TypeVar

import torch

from policies.base import Policy
from policies.train import flatten_optimizer, unflatten_optimizer
from rl.env_loop import EnvLoop


@dataclasses.dataclass
class MethodConfig:
    """Fields every method has; subclasses add theirs and validate in ``__post_init__``."""

    type: ClassVar[str] = ""  # set by @register_method
    hidden_dims: list[int] = dataclasses.field(default_factory=lambda: [256, 256])
    lr: float = 3e-4
    gamma: float = 0.99  # discount per environment step

    def __post_init__(self) -> None:
        if not self.hidden_dims or min(self.hidden_dims) < 1:
            raise ValueError(f"hidden_dims must be a non-empty list of sizes >= 1, got {self.hidden_dims}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")

    def build(self, base: Policy, loop: EnvLoop, context: MethodContext) -> Method:
        raise NotImplementedError(f"{type(self).__name__} does not name a method class")


@dataclasses.dataclass
class MethodContext:
    """What a method may need besides the base and the environment loop."""

    seed: int = 0
    device: str = "cpu"
    task: Any = None  # envs.tasks.Task: demonstrations (DSRL-NA, world model) and evaluation protocol
    env_step_budget: int | None = None  # the run's real-step budget (loop.total_env_steps); world_model stops there


class Method(abc.ABC):
    adapter: Policy

    def __init__(self, config: MethodConfig, base: Policy, loop: EnvLoop, context: MethodContext) -> None:
        self.config, self.base, self.loop, self.context = config, base, loop, context
        self.device = torch.device(context.device)

    @abc.abstractmethod
    def iterate(self) -> dict[str, float]:
        """Collect some real experience through ``self.loop`` and update; returns scalar logs. The runner calls it
        until ``loop.env_steps`` reaches the budget, so one call should add a bounded number of steps (a decision,
        a round)."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to resume besides the adapter weights: ``(tensors, json-able meta)``. The runner adds
        the loop counters and RNG states."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:  # noqa: B027
        """Restore what ``state`` returned (nothing by default)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release resources other than ``self.loop`` (which the runner closes)."""


_METHODS: dict[str, type[MethodConfig]] = {}
# The modules that register methods; imported by entry points (the CLI), never by rl.adapters, so loading an adapted
# checkpoint for deployment does not import training code.
METHOD_MODULES = ("rl.residual_ppo", "rl.residual_sac", "rl.dsrl", "rl.world_model")
C = TypeVar("C", bound=type[MethodConfig])


def register_method(name: str) -> Callable[[C], C]:
    def decorator(cls: C) -> C:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"RL method '{name}' is already registered by {_METHODS[name].__name__}")
        cls.type = name
        _METHODS[name] = cls
        return cls

    return decorator


def import_methods() -> None:
    """Import every method module so that each registers itself."""
    for module in METHOD_MODULES:
        import_module(module)


def method_names() -> list[str]:
    return sorted(_METHODS)


def method_config_class(name: str) -> type[MethodConfig]:
    if name not in _METHODS:
        raise ValueError(f"unknown RL method '{name}'; registered methods: {method_names()}")
    return _METHODS[name]


def pack_state(
    modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Modules' and optimizers' states as ``({name.key: tensor}, meta)`` (safetensors + JSON, no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name, module in modules.items():
        tensors |= {f"{name}.{k}": v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    for name, opt in optimizers.items():
        opt_tensors, meta[name] = flatten_optimizer(opt, prefix=name)
        tensors |= opt_tensors
    return tensors, meta


def unpack_state(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
) -> None:
    """Inverse of ``pack_state``, in place."""
    for name, module in modules.items():
        module.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
    for name, opt in optimizers.items():
        opt.load_state_dict(unflatten_optimizer(tensors, meta[name], prefix=name))
