"""MoDE: Mixture of Denoising Experts (Reuss et al., ICLR 2025, "Efficient Diffusion Transformer Policies with
Mixture of Expert Denoisers for Multitask Learning").

Objective: EDM (``policies.edm``: x = a + sigma * eps; D(x; sigma) predicts the clean chunk) with sigma_data = 0.5,
training levels from BESO/MoDE's truncated log-logistic density on [1e-3, 80], the EDM-weighted denoising loss
plus 0.01 x the Switch-Transformer load-balancing loss of the noise-routed experts (logged separately).
Network: ``policies.networks.mode.MoDETransformer`` over [noise, task, obs (To), action (H)] tokens.
Sampling: deterministic DDIM (= DPM-Solver-1) on the exponential schedule sigma_max=80 -> sigma_min=1e-3 over
``num_inference_steps`` levels (MoDE uses 10), starting from noise * sigma_max.

Expert caching (MoDE sec. 3.3): the routing depends only on sigma, and the sampling levels are fixed by the
schedule, so ``build_expert_cache`` precomputes per step index the EDM scalings, the noise embedding, every layer's
qkv bias W_qkv phi(sigma) and chosen experts fused into one SwiGLU. The cache is keyed by (number of steps, weights
version); the version is every parameter's storage pointer and in-place version counter, which optimizer steps,
EMA updates, ``load_state_dict`` and ``.to(device)`` all change, so the cache is rebuilt (once) after any change of
the weights. Writes through ``param.data`` bypass the version counter: call ``clear_expert_cache`` after those. It
holds about 4.7 MB per sampling step at the default size (47 MB for 10 steps).

Multi-task: with ``n_tasks > 1`` the policy reads ``obs["task"]`` (int64 ids, [B] or [B, To]: the last step is
used) and embeds it as the task token; with ``n_tasks == 1`` the task token is one learned vector.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F

from policies.base import Policy, PolicyConfig
from policies.edm import EDM, ddim_sample
from policies.networks.mode import CachedLevel, MoDETransformer, load_balancing_loss
from policies.registry import register_policy


@register_policy("mode")
@dataclasses.dataclass
class MoDEConfig(PolicyConfig):
    # Network. The paper's CALVIN model is 12 layers x 1024 wide with 4 experts, top-2. CPU-sized: 4 x 128 with
    # expert width 256 (2.0 M parameters). In a 30-minute Push-T budget on one core 4 layers scored 0.912 against
    # 0.872 for 6 layers (2.9 M): more steps (4,005 vs 2,723) outweigh depth at that budget (BENCHMARKS.md).
    embed_dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    expert_hidden_dim: int = 256
    num_experts: int = 4
    top_k: int = 2
    attn_dropout: float = 0.0
    causal_attention: bool = True
    load_balancing_weight: float = 0.01  # MoDE's gamma
    n_tasks: int = 1
    # EDM objective and sampler.
    sigma_data: float = 0.5
    sigma_min: float = 1e-3
    sigma_max: float = 80.0
    num_inference_steps: int = 10
    expert_cache: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "embed_dim",
            "n_layers",
            "n_heads",
            "expert_hidden_dim",
            "num_experts",
            "n_tasks",
            "num_inference_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.embed_dim % self.n_heads:
            raise ValueError(f"embed_dim must be divisible by n_heads={self.n_heads}, got {self.embed_dim}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if not 0 <= self.attn_dropout < 1:
            raise ValueError(f"attn_dropout must be in [0, 1), got {self.attn_dropout}")
        if self.load_balancing_weight < 0:
            raise ValueError(f"load_balancing_weight must be >= 0, got {self.load_balancing_weight}")
        self.edm()  # validates sigma_data, sigma_min, sigma_max

    def edm(self) -> EDM:
        return EDM(sigma_data=self.sigma_data, sigma_min=self.sigma_min, sigma_max=self.sigma_max)

    def build(self, shape_meta: Mapping) -> MoDEPolicy:
        return MoDEPolicy(self, shape_meta)


class CachedStep(NamedTuple):
    """Everything that depends only on one sampling level: EDM scalings and the network's CachedLevel."""

    c_skip: float
    c_out: float
    c_in: float
    level: CachedLevel


class MoDEPolicy(Policy):
    config: MoDEConfig

    def __init__(self, config: MoDEConfig, shape_meta: Mapping) -> None:
        super().__init__(config, shape_meta)
        self.edm = config.edm()
        self.model = MoDETransformer(
            action_dim=self.action_dim,
            obs_dim=self.obs_feature_dim,
            n_obs_steps=config.n_obs_steps,
            horizon=config.horizon,
            n_tasks=config.n_tasks,
            embed_dim=config.embed_dim,
            n_layers=config.n_layers,
            n_heads=config.n_heads,
            expert_hidden_dim=config.expert_hidden_dim,
            num_experts=config.num_experts,
            top_k=config.top_k,
            attn_dropout=config.attn_dropout,
            causal=config.causal_attention,
        )
        # Derived from the weights, never saved: a plain attribute, not a buffer.
        self._cache_key: tuple | None = None
        self._cache: list[CachedStep] = []

    # -- pieces that outside samplers drive ------------------------------------------------------------------
    def task_ids(self, obs: Mapping[str, torch.Tensor], batch: int) -> torch.Tensor:
        """The task id of each sample: int64 [B] (all zeros when n_tasks == 1)."""
        n = self.config.n_tasks
        if n == 1:
            return torch.zeros(batch, dtype=torch.long, device=self.device)
        if "task" not in obs:
            raise ValueError(f"n_tasks={n} needs obs['task'] (int64 task ids of shape [B] or [B, To]); it is missing")
        task = obs["task"]
        if task.dtype.is_floating_point or task.dtype == torch.bool or task.ndim not in (1, 2) or len(task) != batch:
            raise ValueError(
                f"obs['task'] must be an integer tensor of shape [B] or [B, To] with B={batch}, "
                f"got {task.dtype} {list(task.shape)}"
            )
        task = task[:, -1] if task.ndim == 2 else task
        if task.numel() and (task.min() < 0 or task.max() >= n):
            raise ValueError(f"obs['task'] ids must be in [0, {n - 1}], got values in [{task.min()}, {task.max()}]")
        return task.long().to(self.device)

    def encode_obs(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``obs: {k: [B, To, ...]}`` raw (+ ``"task"`` when n_tasks > 1) -> conditioning tokens [B, 1 + To, D]."""
        features = self.obs_features(obs)
        return self.model.embed_condition(features, self.task_ids(obs, features.shape[0]))

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, obs_features: torch.Tensor) -> torch.Tensor:
        """EDM's preconditioned denoiser D(x; sigma) (an estimate of the clean normalized chunk, NOT epsilon):
        x: [B, H, Da] normalized noisy actions at sigma: [B] (or a 0-d tensor), obs_features from ``encode_obs``
        -> D: [B, H, Da]. Uncached: routes per sample."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.edm.scalings(sigma)
        out, _ = self.model(c_in[:, None, None] * x, c_noise, obs_features)
        return c_skip[:, None, None] * x + c_out[:, None, None] * out

    # -- expert cache --------------------------------------------------------------------------------------------
    def weights_version(self) -> tuple:
        """Changes whenever a network weight changes in place (optimizer, EMA, load_state_dict) or is replaced."""
        return tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    def clear_expert_cache(self) -> None:
        self._cache_key, self._cache = None, []

    @torch.no_grad()
    def build_expert_cache(self, num_steps: int | None = None) -> list[CachedStep]:
        """One CachedStep per sampling step index of the ``num_steps`` exponential schedule (default
        ``num_inference_steps``); reused while the weights and the number of steps are unchanged."""
        num_steps = num_steps or self.config.num_inference_steps
        key = (num_steps, self.weights_version())
        if key != self._cache_key:
            self._cache = []
            for s in self.edm.sigmas(num_steps):
                # the same float32 sigma as the uncached path, so both compute identical scalings
                c_skip, c_out, c_in, c_noise = self.edm.scalings(torch.tensor([s], device=self.device))
                level = self.model.fuse_level(c_noise)
                self._cache.append(CachedStep(c_skip.item(), c_out.item(), c_in.item(), level))
            self._cache_key = key
        return self._cache

    # -- contract --------------------------------------------------------------------------------------------
    def compute_loss(self, batch: Mapping) -> tuple[torch.Tensor, dict[str, float]]:
        b = self.check_batch(batch)
        cond = self.encode_obs(batch["obs"])
        action = self.normalizer.normalize("action", batch["action"])  # [B, H, Da]
        sigma = self.edm.sample_sigma(b, device=action.device)
        x = action + sigma[:, None, None] * torch.randn_like(action)
        c_skip, c_out, c_in, c_noise = self.edm.scalings(sigma)
        out, routings = self.model(c_in[:, None, None] * x, c_noise, cond)
        balance = torch.stack([load_balancing_loss(r.probs, r.experts) for r in routings]).mean()
        # lambda(sigma) ||D - a||^2 with lambda = 1 / c_out^2 (EDM eq. 8, Table 1) written in F-space
        target = (action - c_skip[:, None, None] * x) / c_out[:, None, None]
        denoise_loss = F.mse_loss(out, target)
        loss = denoise_loss + self.config.load_balancing_weight * balance
        return loss, {
            "loss": loss.detach(),
            "denoise_loss": denoise_loss.detach(),
            "load_balancing_loss": balance.detach(),
        }

    @torch.no_grad()
    def predict_action_chunk(
        self,
        obs: Mapping[str, torch.Tensor],
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``obs: {k: [B, To, Dk]}`` -> actions ``[B, H, Da]`` in raw units; a deterministic function of ``noise``
        (the initial sample is noise * sigma_max). With ``expert_cache`` the steps run the fused experts of
        ``build_expert_cache``; the result equals the uncached one up to float rounding."""
        b = self.check_obs(obs)
        cond = self.encode_obs(obs)
        noise = self.initial_noise(b, noise, cond.device, generator)
        sigmas = self.edm.sigmas(self.config.num_inference_steps)
        if self.config.expert_cache:
            steps = self.build_expert_cache()

            def denoise_fn(x: torch.Tensor, i: int) -> torch.Tensor:
                s = steps[i]
                return s.c_skip * x + s.c_out * self.model.forward_cached(s.c_in * x, cond, s.level)
        else:

            def denoise_fn(x: torch.Tensor, i: int) -> torch.Tensor:
                return self.denoise(x, torch.full((b,), sigmas[i], device=x.device), cond)

        action = ddim_sample(denoise_fn, noise.to(cond.device) * sigmas[0], sigmas)
        return self.normalizer.unnormalize("action", action)
