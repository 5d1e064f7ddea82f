"""The policy contract shared by every generative action-chunk policy.

Shapes: observations ``obs: {key: [B, To, *shape]}`` (raw units; images float in [0, 1]), actions
``[B, H, Da]`` in raw units. A policy is stateless: one instance serves a batch of environments and the chunk
executor (``envs.executor``) owns queues and history.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from data.normalizer import LinearNormalizer


@dataclasses.dataclass
class PolicyConfig:
    """Fields every chunk policy has. Subclasses add their own and validate in ``__post_init__``."""

    type: ClassVar[str] = ""  # set by @register_policy
    # Offline-RL objectives (OFQL) read transitions: the task then adds ``next_obs``, ``reward`` and ``terminal``
    # to every training batch (see ``data.sequence.SequenceDataset``).
    needs_transitions: ClassVar[bool] = False
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    # Image observations (used only when the shape meta has [C, H, W] keys): one ResNet-18 (GroupNorm) +
    # spatial-softmax encoder per camera, or one shared by every camera; random crop to ``crop_shape`` in
    # training, centre crop at evaluation (Diffusion Policy's image setting: 84x84 crops of 96x96 frames).
    crop_shape: list[int] | None = dataclasses.field(default_factory=lambda: [84, 84])
    vision_keypoints: int = 32
    share_vision_encoder: bool = False
    # Per-action-dim factors s applied after min-max normalization, so that dim spans [-s, s] (RTI-DP, Duan et al.
    # 2025: scaling a discrete dim such as a gripper at training time separates its modes, and a warm-started
    # sampler is then less likely to drift between them; the executor snaps it at execution). None: all 1.
    # A list (length Da) rather than {dim: s}: config.json keys are strings and Hydra schemas take no unions.
    action_scale: list[float] | None = None

    def __post_init__(self) -> None:
        for name in ("horizon", "n_obs_steps", "n_action_steps", "vision_keypoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.action_scale is not None and (
            not self.action_scale or not all(math.isfinite(s) and s > 0 for s in self.action_scale)
        ):
            raise ValueError(
                f"action_scale must be null or a non-empty list of finite factors > 0, got {self.action_scale}"
            )
        if self.crop_shape is not None and (len(self.crop_shape) != 2 or min(self.crop_shape) < 1):
            raise ValueError(f"crop_shape must be null or [height, width] >= 1, got {self.crop_shape}")
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise ValueError(
                f"n_obs_steps - 1 + n_action_steps must be <= horizon, got {self.n_obs_steps} - 1 + "
                f"{self.n_action_steps} > {self.horizon}"
            )

    def build(self, shape_meta: Mapping) -> Policy:
        raise NotImplementedError(f"{type(self).__name__} does not name a policy class")


class Policy(nn.Module, abc.ABC):
    """``compute_loss(batch) -> (loss, logs)`` and ``predict_action_chunk(obs, noise) -> [B, H, Da]``."""

    def __init__(self, config: PolicyConfig, shape_meta: Mapping) -> None:
        super().__init__()
        self.config = config
        self.shape_meta = {
            "obs": {k: list(v) for k, v in shape_meta["obs"].items()},
            "action": list(shape_meta["action"]),
        }
        self.action_dim = int(self.shape_meta["action"][0])
        if config.action_scale is not None and len(config.action_scale) != self.action_dim:
            raise ValueError(
                f"action_scale must have one factor per action dim ({self.action_dim}), got {config.action_scale}"
            )
        self.lowdim_keys = [k for k, s in self.shape_meta["obs"].items() if len(s) == 1]
        self.image_keys = [k for k, s in self.shape_meta["obs"].items() if len(s) == 3]
        dims = {k: self.shape_meta["obs"][k][0] for k in self.lowdim_keys}
        self.normalizer = LinearNormalizer({**dims, "action": self.action_dim})
        self.image_encoder: nn.Module | None = None
        if self.image_keys:
            from policies.networks.vision import MultiImageEncoder  # only image policies build a ResNet

            self.image_encoder = MultiImageEncoder(
                {k: self.shape_meta["obs"][k] for k in self.image_keys},
                crop_shape=config.crop_shape,
                num_keypoints=config.vision_keypoints,
                share=config.share_vision_encoder,
            )
        self.obs_feature_dim = sum(dims.values()) + (self.image_encoder.out_dim if self.image_encoder else 0)

    def obs_features(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-step observation features: ``obs {k: [B, To, ...]}`` raw -> ``[B, To, obs_feature_dim]``
        (normalized low-dimensional keys in shape-meta order, then the image features)."""
        parts = [self.normalizer.normalize(k, obs[k]) for k in self.lowdim_keys]
        if self.image_encoder is not None:
            parts.append(self.image_encoder({k: obs[k] for k in self.image_keys}))
        return torch.cat(parts, dim=-1)

    # -- contract --------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def compute_loss(self, batch: Mapping) -> tuple[torch.Tensor, dict[str, float]]: ...

    @abc.abstractmethod
    def predict_action_chunk(
        self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None
    ) -> torch.Tensor: ...

    def after_optimizer_step(self) -> None:
        """Called by the training loop after every optimizer step (e.g. Polyak-averaged target critics)."""

    def grad_clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameter groups whose gradient norms the training loop clips separately (``train.grad_clip`` each).
        Default: one group of every parameter. A policy with parts trained by different losses (OFQL's actor and
        critics) returns one group per part, so that one part's large gradients do not shrink the other's."""
        return [list(self.parameters())]

    def fit_normalizer(self, data: Mapping[str, torch.Tensor]) -> None:
        """Fit min-max statistics of low-dimensional observations and actions (images are already [0, 1]); the
        config's ``action_scale`` multiplies the normalized actions."""
        scale = {"action": self.config.action_scale} if self.config.action_scale is not None else None
        self.normalizer.fit({k: data[k] for k in [*self.lowdim_keys, "action"]}, gains=scale)

    # -- input checks (user-facing errors) -------------------------------------------------------------------
    def check_obs(self, obs: Mapping[str, torch.Tensor]) -> int:
        """Validate ``obs`` against the shape meta; return the batch size."""
        expected = self.shape_meta["obs"]
        missing = set(expected) - set(obs)
        if missing:
            raise ValueError(f"observation is missing keys {sorted(missing)}; expected keys {sorted(expected)}")
        batch = None
        to = self.config.n_obs_steps
        for key, shape in expected.items():
            x = obs[key]
            want = [to, *shape]
            if x.ndim != len(want) + 1 or list(x.shape[1:]) != want or (batch is not None and x.shape[0] != batch):
                raise ValueError(
                    f"observation '{key}' has shape {list(x.shape)}, expected [B, {', '.join(map(str, want))}]"
                    + (f" with B={batch}" if batch is not None else "")
                )
            batch = x.shape[0]
            if key in self.lowdim_keys and not torch.isfinite(x).all():
                raise ValueError(f"observation '{key}' contains NaN or inf")
        return batch

    def check_batch(self, batch: Mapping) -> int:
        b = self.check_obs(batch["obs"])
        action = batch["action"]
        want = [b, self.config.horizon, self.action_dim]
        if list(action.shape) != want:
            raise ValueError(f"batch 'action' has shape {list(action.shape)}, expected {want}")
        if not torch.isfinite(action).all():
            raise ValueError("batch 'action' contains NaN or inf")
        return b

    def check_noise(self, noise: torch.Tensor, batch: int, name: str = "noise") -> None:
        """``noise`` (or another chunk-shaped input called ``name``) must be ``[B, H, Da]``."""
        want = [batch, self.config.horizon, self.action_dim]
        if list(noise.shape) != want:
            raise ValueError(f"{name} has shape {list(noise.shape)}, expected {want}")

    def initial_noise(
        self, batch: int, noise: torch.Tensor | None, device: torch.device, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The generative process's initial sample ``[B, H, Da]``: the injected ``noise`` (checked) or a fresh
        standard normal draw from ``generator``."""
        if noise is None:
            return torch.randn((batch, self.config.horizon, self.action_dim), device=device, generator=generator)
        self.check_noise(noise, batch)
        return noise.to(device)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
