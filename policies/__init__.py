"""Action-chunk policies: contract, registry, checkpoints, training loop. Importing registers every policy."""

from policies import diffusion_unet  # noqa: F401  (registers "diffusion_unet")
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
