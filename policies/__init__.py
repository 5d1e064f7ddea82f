"""Action-chunk policies: contract, registry, checkpoints, training loop. Importing registers every policy."""

# Each module registers its config with @register_policy on import.
from policies import (  # noqa: F401
    diffusion_transformer,
    diffusion_unet,
    flow_unet,
    meanflow,
    mode,
    ofql,
    streaming,
)
from policies.base import Policy, PolicyConfig
from policies.checkpoint import load_policy, save_checkpoint
from policies.registry import make_policy, policy_names, register_policy

__all__ = [
    "Policy",
    "PolicyConfig",
    "load_policy",
    "make_policy",
    "policy_names",
    "register_policy",
    "save_checkpoint",
]
