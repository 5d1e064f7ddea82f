"""Policy registry: ``@register_policy("name")`` on a config dataclass; build by name or from a checkpoint.

Policy types defined outside ``policies`` (the RL adapters of ``rl``, which import ``policies`` and so cannot be
imported by it) are declared as ``robodiff.policies`` entry points in ``pyproject.toml`` (name -> module); the
module is imported, and registers itself, the first time its name is asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, TypeVar

from policies.base import Policy, PolicyConfig

_REGISTRY: dict[str, type[PolicyConfig]] = {}
ENTRY_POINT_GROUP = "robodiff.policies"
C = TypeVar("C", bound=type[PolicyConfig])


def register_policy(name: str) -> Callable[[C], C]:
    """Register a config dataclass under ``name``; returns the class unchanged."""

    def decorator(cls: C) -> C:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"policy '{name}' is already registered by {_REGISTRY[name].__name__}")
        cls.type = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def plugin_names() -> list[str]:
    """Policy types declared as entry points (registered once their module is imported)."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def config_class(name: str) -> type[PolicyConfig]:
    if name not in _REGISTRY:
        for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
            import_module(ep.value)
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy '{name}'; registered policies: {policy_names()}")
    return _REGISTRY[name]


def config_from_dict(name: str, values: Mapping[str, Any]) -> PolicyConfig:
    """Typed config from plain values (e.g. ``config.json``); unknown fields are an error."""
    cls = config_class(name)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"policy '{name}' config has unknown fields {unknown}; known fields: {sorted(known)}")
    return cls(**values)


def make_policy(config: PolicyConfig, shape_meta: Mapping) -> Policy:
    if not config.type:
        raise ValueError(f"{type(config).__name__} is not registered with @register_policy")
    return config.build(shape_meta)
