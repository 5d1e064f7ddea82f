"""Test-time policy composition (General Policy Composition: Cao et al. 2025, "Compose Your Policies!").

Several trained policies become one, with no training. All parents share one noise trajectory: at every denoising
step each parent predicts epsilon (DDPM/DDIM parents) or velocity (rectified-flow parents) for the same sample at
the same noise level, conditioned through its own observation encoder on its own observation keys, and the
combination drives one step of the shared sampler:

    convex   eps = sum_i w_i eps_i,   w_i >= 0, sum_i w_i = 1  (the paper's general policy composition)
    product  eps = sum_i w_i eps_i,   w_i >= 0                 (a sum of scores: w = (1, 1) samples p1 * p2)
    mixture  each batch element runs one parent end to end, drawn with probabilities w

Time conventions are the parents' own and are never mixed: DDPM/DDIM levels k = 0 clean .. K-1 noisiest with
epsilon prediction (``policies.schedulers``), or flow time t = 0 data .. 1 noise with v = eps - a
(``policies.flow``). Parents must therefore share the action space, horizon, observation window, action
normalization and noise schedule (or flow path): ``check_parents`` names the first property that differs.

A composition is a registered policy type (``composed``; its checkpoint holds every parent's weights and config), so
``robodiff eval`` and the deployment loop load it like any policy. ``search_weights`` picks the weights on
validation seeds (``deploy.weight_search``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from policies.base import Policy, PolicyConfig
from policies.ddpm import SAMPLERS as DDPM_SAMPLERS
from policies.ddpm import DDPMPolicy
from policies.flow import SAMPLERS as FLOW_SAMPLERS
from policies.flow_unet import FlowUnetPolicy
from policies.registry import config_from_dict, make_policy, register_policy

OPERATORS = ("convex", "product", "mixture")
WEIGHT_TOL = 1e-6  # |sum(w) - 1| allowed for convex and mixture weights


def parent_kind(policy: Any) -> str:
    """``"eps"`` (DDPM/DDIM epsilon prediction) or ``"velocity"`` (rectified flow); anything else cannot compose."""
    if isinstance(policy, DDPMPolicy) and getattr(policy, "default_executor", "chunk") == "chunk":
        return "eps"
    if isinstance(policy, FlowUnetPolicy):
        return "velocity"
    name = getattr(getattr(policy, "config", None), "type", type(policy).__name__)
    raise ValueError(
        f"policy '{name}' cannot be composed: composition combines the per-step predictions of parents that share "
        "one sampler, i.e. DDPM/DDIM epsilon policies (diffusion_unet, diffusion_transformer) or rectified-flow "
        "velocity policies (flow_unet); streaming, one-step (meanflow, ofql), EDM (mode) and RL-adapted policies "
        "have no such shared step"
    )


def check_weights(weights: Sequence[float], n_parents: int, operator: str = "convex") -> tuple[float, ...]:
    """Validated weights as a tuple: one per parent, finite, >= 0; convex and mixture weights sum to one
    (within ``WEIGHT_TOL``); product weights need one > 0."""
    if operator not in OPERATORS:
        raise ValueError(f"operator must be one of {OPERATORS}, got {operator!r}")
    w = tuple(float(x) for x in weights)
    if len(w) != n_parents:
        raise ValueError(f"weights must have one entry per parent ({n_parents}), got {len(w)}: {list(w)}")
    if not all(math.isfinite(x) for x in w) or min(w) < 0:
        raise ValueError(f"weights must be finite and >= 0, got {list(w)}")
    if operator == "product":
        if max(w) <= 0:
            raise ValueError(f"product weights need at least one > 0, got {list(w)}")
    elif abs(sum(w) - 1.0) > WEIGHT_TOL:
        raise ValueError(f"{operator} weights must sum to 1 (within {WEIGHT_TOL}), got sum {sum(w):.6g}: {list(w)}")
    return w


def _differs(name: str, i: int, a: Any, b: Any) -> ValueError:
    return ValueError(f"parents differ in {name}: parent 0 has {a}, parent {i} has {b}; composed parents must share it")


def _schedule_signature(policy: Any) -> dict[str, Any]:
    """What the shared sampler depends on besides the network: the noise schedule or the flow path."""
    c = policy.config
    if parent_kind(policy) == "eps":
        return {"num_train_timesteps": c.num_train_timesteps, "beta_schedule": c.beta_schedule}
    return {"flow path": "rectified flow x_t = (1 - t) a + t eps"}  # every FlowUnetPolicy uses policies.flow's path


def check_parents(parents: Sequence[Any]) -> None:
    """Raise a ``ValueError`` naming the first property the parents do not share (see the module docstring)."""
    if len(parents) < 2:
        raise ValueError(f"composition needs at least 2 parents, got {len(parents)}")
    first = parents[0]
    kinds = [parent_kind(p) for p in parents]
    for i, p in enumerate(parents[1:], 1):
        if kinds[i] != kinds[0]:
            raise _differs(
                "prediction type (epsilon vs flow velocity: different noise paths cannot share a sampler)",
                i,
                f"{first.config.type} ({kinds[0]})",
                f"{p.config.type} ({kinds[i]})",
            )
        for name, get in (
            ("action shape", lambda q: q.shape_meta["action"]),
            ("horizon", lambda q: q.config.horizon),
            ("n_obs_steps (observation window, which fixes the chunk's alignment)", lambda q: q.config.n_obs_steps),
            ("action_scale", lambda q: q.config.action_scale),
            ("clip_sample", lambda q: q.config.clip_sample),
            ("noise schedule / flow path", _schedule_signature),
        ):
            if get(p) != get(first):
                raise _differs(name, i, get(first), get(p))
        for buf in ("action_scale", "action_offset"):  # the normalizer's affine map of actions
            a, b = (getattr(q.normalizer, buf) for q in (first, p))
            if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-6, atol=1e-8):
                raise _differs(
                    f"action normalization ({buf}; train the parents on data with the same action range)",
                    i,
                    a.tolist(),
                    b.tolist(),
                )
        for key, shape in p.shape_meta["obs"].items():
            for j, q in enumerate(parents[:i]):
                if key in q.shape_meta["obs"] and list(q.shape_meta["obs"][key]) != list(shape):
                    raise ValueError(
                        f"parents {j} and {i} both observe {key!r} but with shapes {q.shape_meta['obs'][key]} and "
                        f"{shape}; a shared observation key must have one shape"
                    )


@register_policy("composed")
@dataclasses.dataclass
class ComposedConfig(PolicyConfig):
    """A composition of saved parents. ``parents``: one ``{"policy_type", "policy", "shape_meta"}`` per parent (as
    in their checkpoints' config.json); horizon and n_obs_steps are the parents' (checked to agree)."""

    parents: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    weights: list[float] = dataclasses.field(default_factory=list)
    operator: str = "convex"
    sampler: str | None = None  # None: parent 0's (ddim/ddpm for epsilon parents, euler/midpoint for flow)
    num_inference_steps: int | None = None  # None: parent 0's
    crop_shape: list[int] | None = None  # unused (each parent crops its own images); kept off the shared default

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.parents) < 2:
            raise ValueError(f"a composition needs at least 2 parents, got {len(self.parents)}")
        for i, parent in enumerate(self.parents):
            missing = {"policy_type", "policy", "shape_meta"} - set(parent)
            if missing:
                raise ValueError(f"parent {i} lacks {sorted(missing)}: expected a checkpoint's config.json entries")
        check_weights(self.weights, len(self.parents), self.operator)
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1 or null, got {self.num_inference_steps}")

    def build(self, shape_meta: Mapping) -> ComposedPolicy:
        return ComposedPolicy(self, shape_meta)


class ComposedPolicy(nn.Module):
    """The policy contract (``predict_action_chunk(obs, noise) -> [B, H, Da]`` raw) over frozen parents.

    Not a ``policies.base.Policy`` subclass: it has no normalizer or encoder of its own (each parent keeps its
    own) and no training objective."""

    default_executor = "chunk"

    def __init__(self, config: ComposedConfig, shape_meta: Mapping, parents: nn.ModuleList | None = None) -> None:
        """``parents``: already-built parent modules to share (``with_weights``); None builds them from the config
        (their weights come from the composed checkpoint)."""
        super().__init__()
        self.config = config
        if parents is None:
            parents = nn.ModuleList(
                make_policy(config_from_dict(p["policy_type"], p["policy"]), p["shape_meta"]) for p in config.parents
            )
            parents.eval().requires_grad_(False)
        self.parents = parents
        check_parents(list(self.parents))
        self.kind = parent_kind(self.parents[0])
        self.weights = check_weights(config.weights, len(self.parents), config.operator)
        self.shape_meta = {"obs": _union_obs(self.parents), "action": list(self.parents[0].shape_meta["action"])}
        if shape_meta and shape_meta.get("obs") and _plain(shape_meta) != self.shape_meta:
            raise ValueError(f"shape_meta {dict(shape_meta)} does not match the parents' {self.shape_meta}")
        self.action_dim = int(self.shape_meta["action"][0])
        first = self.parents[0].config
        if config.horizon != first.horizon or config.n_obs_steps != first.n_obs_steps:
            raise ValueError(
                f"horizon and n_obs_steps are the parents' ({first.horizon}, {first.n_obs_steps}), got "
                f"({config.horizon}, {config.n_obs_steps})"
            )
        self.num_inference_steps = config.num_inference_steps or first.num_inference_steps
        self.sampler = config.sampler or first.sampler
        samplers = DDPM_SAMPLERS if self.kind == "eps" else FLOW_SAMPLERS
        if self.sampler not in samplers:
            raise ValueError(f"sampler must be one of {samplers} for {first.type} parents, got {self.sampler!r}")

    # -- helpers ---------------------------------------------------------------------------------------------
    def check_obs(self, obs: Mapping[str, torch.Tensor]) -> int:
        missing = set(self.shape_meta["obs"]) - set(obs)
        if missing:
            raise ValueError(
                f"observation is missing keys {sorted(missing)}; the parents observe {sorted(self.shape_meta['obs'])}"
            )
        sizes = {p.check_obs(_select(obs, p)) for p in self.parents}
        if len(sizes) != 1:
            raise ValueError(f"observation keys have different batch sizes {sorted(sizes)}")
        return sizes.pop()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def with_weights(self, weights: Sequence[float], operator: str | None = None) -> ComposedPolicy:
        """The same parents (shared, not copied) under other weights: what the weight search sweeps."""
        config = dataclasses.replace(self.config, weights=list(weights), operator=operator or self.config.operator)
        return ComposedPolicy(config, {}, parents=self.parents)

    def combined_prediction(
        self, obs: Mapping[str, torch.Tensor]
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(x_t [B, H, Da] normalized, t [B]) -> sum_i w_i pred_i(x_t, t)`` with each parent encoding its own
        observation keys once; parents with weight 0 are not run (so weights (1, 0, ...) are parent 0 exactly)."""
        active = [(w, p, p.encode_obs(_select(obs, p))) for w, p in zip(self.weights, self.parents, strict=True) if w]

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = None
            for w, p, cond in active:
                term = w * p.denoise(x, t, cond)
                out = term if out is None else out + term
            return out

        return predict

    # -- contract --------------------------------------------------------------------------------------------
    def compute_loss(self, batch: Mapping) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError("a composed policy is assembled from trained parents at test time, not trained")

    @torch.no_grad()
    def predict_action_chunk(
        self,
        obs: Mapping[str, torch.Tensor],
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``obs: {k: [B, To, ...]}`` (the union of the parents' keys) -> actions ``[B, H, Da]`` raw. Deterministic
        given ``noise`` for DDIM/flow parents (the mixture's choice of parent also draws from ``generator``)."""
        b = self.check_obs(obs)
        first = self.parents[0]
        obs = {k: v.to(first.device) for k, v in obs.items()}
        x = first.initial_noise(b, noise, first.device, generator)
        if self.config.operator == "mixture":
            return self._mixture(obs, x, generator)
        predict = self.combined_prediction(obs)
        if self.kind == "eps":
            top = first.config.num_train_timesteps - 1
            x0 = first.sample_with(predict, x, top, self.num_inference_steps, generator, sampler=self.sampler)
        else:
            x0 = first.integrate_with(predict, x, 1.0, self.num_inference_steps, sampler=self.sampler)
        return first.normalizer.unnormalize("action", x0)

    def _mixture(
        self, obs: Mapping[str, torch.Tensor], x: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Each batch element is one parent's sample from its own row of the shared noise; parent i is drawn with
        probability w_i (from ``generator``)."""
        probs = torch.tensor(self.weights, dtype=torch.float64)
        choice = torch.multinomial(probs, x.shape[0], replacement=True, generator=generator).to(x.device)
        out = torch.empty_like(x)
        for i in range(len(self.parents)):
            rows = torch.nonzero(choice == i).flatten()
            if len(rows):
                alone = self.with_weights(one_hot(i, len(self.parents)), "convex")
                out[rows] = alone.predict_action_chunk(_subset(obs, rows), noise=x[rows], generator=generator)
        return out


def one_hot(i: int, n: int) -> tuple[float, ...]:
    """Weights that select parent ``i`` of ``n`` alone."""
    return tuple(1.0 if j == i else 0.0 for j in range(n))


def _subset(obs: Mapping[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in obs.items()}


def _select(obs: Mapping[str, torch.Tensor], policy: Any) -> dict[str, torch.Tensor]:
    """The observation keys ``policy`` was trained on."""
    return {k: obs[k] for k in policy.shape_meta["obs"]}


def _union_obs(parents: Sequence[Any]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for p in parents:
        for k, shape in p.shape_meta["obs"].items():
            out.setdefault(k, list(shape))
    return out


def _plain(shape_meta: Mapping) -> dict:
    return {"obs": {k: list(v) for k, v in shape_meta["obs"].items()}, "action": list(shape_meta["action"])}


def compose(
    parents: Sequence[Policy],
    weights: Sequence[float],
    operator: str = "convex",
    n_action_steps: int | None = None,
    sampler: str | None = None,
    num_inference_steps: int | None = None,
) -> ComposedPolicy:
    """Compose loaded parent policies (their weights are copied into the composition, which is frozen)."""
    check_parents(parents)
    first = parents[0].config
    config = ComposedConfig(
        parents=[
            {"policy_type": p.config.type, "policy": dataclasses.asdict(p.config), "shape_meta": p.shape_meta}
            for p in parents
        ],
        weights=list(weights),
        operator=operator,
        sampler=sampler,
        num_inference_steps=num_inference_steps,
        horizon=first.horizon,
        n_obs_steps=first.n_obs_steps,
        n_action_steps=n_action_steps or first.n_action_steps,
    )
    composed = ComposedPolicy(config, {})
    for mine, theirs in zip(composed.parents, parents, strict=True):
        mine.load_state_dict(theirs.state_dict())
    return composed.to(parents[0].device).eval()


def load_parents(checkpoints: Sequence[str], device: str | torch.device = "cpu") -> list[Policy]:
    """Load parent checkpoints; a missing or unusable one is named in the error."""
    from policies.checkpoint import load_policy

    out = []
    for i, ckpt in enumerate(checkpoints):
        try:
            out.append(load_policy(ckpt, device=device))
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"parent {i} ({ckpt}): {err}") from err
    return out
