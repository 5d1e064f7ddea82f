"""RL adapters: a frozen base policy plus a small trainable module, exposing the policy contract.

An adapter is a registered policy type (``residual``, ``dsrl``) whose config holds the base's type and config, and
whose checkpoint holds the base weights beside its own, so ``robodiff eval`` and ``deploy`` load an adapted
checkpoint like any other (``policies.registry`` finds these types through the ``robodiff.policies`` entry point,
so ``policies`` never imports ``rl``). The base is frozen: ``eval()`` and ``requires_grad_(False)``; its weights are
never handed to an optimizer.

- ``ResidualPolicy`` (ResiP, Ankile et al. 2024; Policy Decorator, Yuan et al. 2024): per control step,
  ``a = base_action + residual_scale * mu(obs_t, base_action)`` in normalized action units, where ``mu`` is an MLP
  whose output layer starts at zero, so the adapter starts exactly at the base. The chunk executor applies the
  correction at every executed step with that step's observation (``envs.executor.CorrectedPolicy``).
- ``NoisePolicy`` (DSRL, Wagenmaker et al. 2025): ``a = base.predict_action_chunk(obs, noise=w)`` with
  ``w = b * tanh(mu(obs) + std(obs) * xi)`` in ``[-b, b]^(H x Da)``; at inference ``xi = 0`` (the actor's mean)
  unless ``noise`` (``xi``) is given. The base samples deterministically from ``w`` (DDIM eta 0, flow ODE).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from torch import nn

from policies.base import Policy, PolicyConfig
from policies.registry import config_from_dict, make_policy, register_policy
from rl.networks import MLP, GaussianHead

# The base fields an adapter inherits: they describe the data the base was trained on, so they are copied from the
# base config and checked, never chosen twice.
INHERITED_FIELDS = ("horizon", "n_obs_steps", "n_action_steps", "action_scale", "crop_shape")


def freeze(policy: Policy) -> Policy:
    """Inference mode and no gradients for every parameter of ``policy`` (returned for chaining)."""
    policy.eval()
    policy.requires_grad_(False)
    return policy


@dataclasses.dataclass
class AdapterConfig(PolicyConfig):
    """Fields shared by adapters: the base's registered type and its resolved config (as saved in its checkpoint)."""

    base_type: str = ""
    base_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    hidden_dims: list[int] = dataclasses.field(default_factory=lambda: [256, 256])

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.base_type:
            raise ValueError("base_type must name the registered type of the base policy, got ''")
        if not self.hidden_dims or min(self.hidden_dims) < 1:
            raise ValueError(f"hidden_dims must be a non-empty list of sizes >= 1, got {self.hidden_dims}")
        for name in INHERITED_FIELDS:
            if name in self.base_config and self.base_config[name] != getattr(self, name):
                raise ValueError(
                    f"{name} is the base policy's ({self.base_config[name]!r}); an adapter cannot change it, "
                    f"got {getattr(self, name)!r}"
                )

    @classmethod
    def for_base(cls, base: Policy, **fields: Any) -> AdapterConfig:
        """The adapter config for a loaded ``base`` with the adapter's own ``fields``."""
        base_config = dataclasses.asdict(base.config)
        inherited = {name: base_config[name] for name in INHERITED_FIELDS}
        return cls(base_type=base.config.type, base_config=base_config, **inherited, **fields)


def adapter_around(config_cls: type[AdapterConfig], base: Policy, **fields: Any) -> Adapter:
    """An adapter of type ``config_cls`` around a loaded ``base``: its weights and normalizer are copied into the
    adapter's frozen ``base``, on the base's device; ``fields`` are the adapter config's own fields."""
    adapter = config_cls.for_base(base, **fields).build(base.shape_meta)
    adapter.base.load_state_dict(base.state_dict())  # copies values: the adapter's base stays frozen
    return adapter.to(base.device)


class Adapter(Policy):
    """A frozen ``self.base`` plus trainable modules; ``trainable_parameters()`` excludes the base."""

    config: AdapterConfig

    def __init__(self, config: AdapterConfig, shape_meta: Mapping) -> None:
        super().__init__(config, shape_meta)
        base_config = config_from_dict(config.base_type, config.base_config)
        self.base = freeze(make_policy(base_config, shape_meta))
        self.normalizer = self.base.normalizer  # one set of statistics: the base's
        self.image_encoder = None  # the base encodes images (Policy.__init__ built an unused copy)
        self.obs_dim = self.base.obs_feature_dim
        default_executor = getattr(self.base, "default_executor", None)
        if default_executor is not None and default_executor != "chunk":
            raise ValueError(
                f"base policy '{config.base_type}' runs with the {default_executor!r} executor; RL adapters take "
                "chunk policies (predict_action_chunk)"
            )

    def train(self, mode: bool = True) -> Adapter:
        super().train(mode)
        self.base.eval()  # the base stays in inference mode (dropout, image crops) whatever the adapter does
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        base = {id(p) for p in self.base.parameters()}
        return [p for p in self.parameters() if id(p) not in base]

    def compute_loss(self, batch: Mapping) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError(f"a '{self.config.type}' adapter is trained by `robodiff adapt`, not `train`")

    def fit_normalizer(self, data: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError("an adapter uses its base policy's normalizer")

    def features(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``obs {k: [B, To, ...]}`` raw -> the frozen base's per-step features ``[B, To, F]`` (normalized)."""
        with torch.no_grad():
            return self.base.obs_features(obs)


@register_policy("residual")
@dataclasses.dataclass
class ResidualConfig(AdapterConfig):
    residual_scale: float = 0.1  # ResiP: the correction is at most a small fraction of the normalized action range
    init_log_std: float = -1.0
    learn_log_std: bool = False  # PPO: a state-independent log-std, fixed or learned
    squash: bool = False  # SAC: the residual is tanh(actor(x)) in (-1, 1); tanh(0) = 0 keeps the zero start

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.residual_scale > 0:
            raise ValueError(f"residual_scale must be > 0, got {self.residual_scale}")

    def build(self, shape_meta: Mapping) -> ResidualPolicy:
        return ResidualPolicy(self, shape_meta)


class ResidualPolicy(Adapter):
    """Per-step Gaussian residual on a frozen chunk policy. Input: the latest observation's features and the base
    action about to be executed (normalized); output: a correction in normalized action units times
    ``residual_scale``."""

    config: ResidualConfig

    def __init__(self, config: ResidualConfig, shape_meta: Mapping) -> None:
        super().__init__(config, shape_meta)
        self.input_dim = self.obs_dim + self.action_dim
        self.actor = MLP(self.input_dim, config.hidden_dims, self.action_dim, zero_last=True)
        self.log_std = nn.Parameter(
            torch.full((self.action_dim,), float(config.init_log_std)), requires_grad=config.learn_log_std
        )

    def actor_input(self, obs: Mapping[str, torch.Tensor], base_action: torch.Tensor) -> torch.Tensor:
        """``obs {k: [B, To, ...]}``, ``base_action [B, Da]`` raw -> ``[B, F + Da]`` (latest frame, normalized)."""
        return torch.cat([self.features(obs)[:, -1], self.normalizer.normalize("action", base_action)], dim=-1)

    def apply_residual(self, base_action: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``base_action [..., Da]`` raw, ``residual [..., Da]`` normalized units -> executed action raw:
        ``unnormalize(normalize(a) + residual_scale * r)`` computed as ``a + residual_scale * r / scale`` (the
        normalizer is affine), so a zero residual returns the base action bit for bit."""
        return base_action + self.config.residual_scale * residual / self.normalizer.action_scale

    def residual_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic residual ``[..., Da]`` for actor inputs ``x [..., F + Da]`` (tanh-squashed if
        ``config.squash``)."""
        mu = self.actor(x)
        return torch.tanh(mu) if self.config.squash else mu

    def base_action_chunk(self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.base.predict_action_chunk(obs, noise=noise)

    @torch.no_grad()
    def correct_action(self, obs: Mapping[str, torch.Tensor], action: torch.Tensor) -> torch.Tensor:
        """The deterministic (mean) correction of one executed base ``action [B, Da]`` given ``obs`` [B, To, ...]."""
        return self.apply_residual(action, self.residual_mean(self.actor_input(obs, action)))

    @torch.no_grad()
    def predict_action_chunk(self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, H, Da]``: every base action corrected with this observation window. The chunk executor instead
        corrects each action with the observation of the step that executes it (``correct_action``); this form is
        for callers that take whole chunks from one observation (asynchronous deployment)."""
        chunk = self.base_action_chunk(obs, noise)
        h = chunk.shape[1]
        feats = self.features(obs)[:, -1:].expand(-1, h, -1)  # [B, H, F]
        x = torch.cat([feats, self.normalizer.normalize("action", chunk)], dim=-1)
        return self.apply_residual(chunk, self.residual_mean(x))


NOISE_SPACES = ("box", "sphere")


def to_sphere(w: torch.Tensor) -> torch.Tensor:
    """``w [B, ...]`` rescaled per sample to the norm ``sqrt(numel per sample)`` of a typical N(0, I) draw."""
    norm = w.flatten(1).norm(dim=1).clamp_min(1e-6)
    return w * (math.sqrt(w[0].numel()) / norm).view(-1, *([1] * (w.ndim - 1)))


@register_policy("dsrl")
@dataclasses.dataclass
class NoiseConfig(AdapterConfig):
    noise_bound: float = 1.5  # DSRL's b: w in [-b, b]^(H x Da)
    # box: the base samples from w itself. sphere: from w rescaled to the norm sqrt(H * Da) of a typical N(0, I)
    # draw (the actor picks the direction): the base's chunks degrade off that shell (BENCHMARKS.md, DSRL).
    noise_space: str = "box"
    # predict_action_chunk with no noise given: the actor's mean latent b * tanh(mu) (False), or a fresh draw
    # b * tanh(mu + std * xi) (True: the stochastic policy SAC trained, which DSRL's own evaluation runs).
    sample_latent: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.noise_bound > 0:
            raise ValueError(f"noise_bound must be > 0, got {self.noise_bound}")
        if self.noise_space not in NOISE_SPACES:
            raise ValueError(f"noise_space must be one of {NOISE_SPACES}, got {self.noise_space!r}")
        sampler = self.base_config.get("sampler")
        if sampler is not None and sampler != "ddim":
            raise ValueError(
                f"DSRL needs a base that samples deterministically from its noise (sampler 'ddim', eta 0, or a flow "
                f"ODE), got sampler {sampler!r}"
            )

    def build(self, shape_meta: Mapping) -> NoisePolicy:
        return NoisePolicy(self, shape_meta)


class NoisePolicy(Adapter):
    """DSRL's latent-noise actor: a tanh-squashed Gaussian over the base's initial noise ``w [B, H, Da]``, from
    the flattened observation window's features ``[B, To * F]``."""

    config: NoiseConfig

    def __init__(self, config: NoiseConfig, shape_meta: Mapping) -> None:
        super().__init__(config, shape_meta)
        self.noise_shape = (config.horizon, self.action_dim)
        self.noise_dim = config.horizon * self.action_dim
        self.input_dim = config.n_obs_steps * self.obs_dim
        self.actor = GaussianHead(self.input_dim, config.hidden_dims, self.noise_dim)

    def actor_input(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``obs {k: [B, To, ...]}`` raw -> ``[B, To * F]``."""
        return rearrange(self.features(obs), "b t f -> b (t f)")

    def sample_noise(
        self, obs: Mapping[str, torch.Tensor], xi: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised ``w = b * tanh(mu + std * xi)`` ``[B, H, Da]`` and its log-probability ``[B]``
        (SAC's tanh correction, Haarnoja et al. 2018, app. C). ``xi`` None: a fresh standard normal draw."""
        u, log_prob = self.actor.sample(self.actor_input(obs), xi=None if xi is None else xi.flatten(1))
        w = self.config.noise_bound * u
        return w.unflatten(1, self.noise_shape), log_prob

    def mean_noise(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The deterministic latent ``b * tanh(mu(obs))`` ``[B, H, Da]``."""
        return (self.config.noise_bound * self.actor.mean(self.actor_input(obs))).unflatten(1, self.noise_shape)

    def chunk_from_noise(self, obs: Mapping[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
        """``w [B, H, Da]`` -> the base's chunk ``[B, H, Da]`` raw, deterministic in ``w`` (the base samples from
        ``base_noise(w)``)."""
        return self.base.predict_action_chunk(obs, noise=self.base_noise(w))

    def base_noise(self, w: torch.Tensor) -> torch.Tensor:
        """The base's initial noise for the latent ``w [B, H, Da]``: ``w`` (box), or ``w`` rescaled to the norm
        ``sqrt(H * Da)`` (sphere)."""
        return w if self.config.noise_space == "box" else to_sphere(w)

    @torch.no_grad()
    def predict_action_chunk(self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        """``noise`` here is the actor's standard-normal input ``xi [B, H, Da]`` (None: the actor's mean, or a fresh
        draw with ``sample_latent``), so a given ``noise`` fixes the chunk, as the policy contract asks."""
        b = self.check_obs(obs)
        if noise is None and self.config.sample_latent:
            w, _ = self.sample_noise(obs)
        elif noise is None:
            w = self.mean_noise(obs)
        else:
            self.check_noise(noise, b)
            w, _ = self.sample_noise(obs, noise)
        return self.chunk_from_noise(obs, w)
