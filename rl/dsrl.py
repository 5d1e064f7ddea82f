"""DSRL: diffusion steering by RL in the base policy's latent-noise space (Wagenmaker et al. 2025).

The RL action is the base's initial noise for a whole chunk, ``w in [-b, b]^(H x Da)``; the frozen base samples
deterministically from it (DDIM eta 0 or the flow ODE), so ``w`` fixes the chunk, and the chunk's executed part
``chunk[:, To-1 : To-1+Ta]`` runs in the environment (one decision = Ta steps). The actor is the adapter's
tanh-squashed Gaussian (``rl.adapters.NoisePolicy``); critics see ``u = w / b``.

- ``dsrl`` (DSRL-SAC): SAC (Haarnoja et al. 2018) with the twin critic on ``(s, u)``.
- ``dsrl_na`` (DSRL-NA, noise aliasing): an action-space critic ``Q^A(s, a)`` trained by TD on executed chunks
  (optionally also on demonstration chunks), a noise-space critic ``Q^W(s, w)`` regressed to
  ``Q^A(s, base(s, w))`` for ``w ~ N(0, I)``, and the actor maximising ``Q^W`` with target entropy 0. Two choices
  keep the base out of the update step (it costs a full denoising run per sample): the ``(w, base(s, w))`` pairs
  for the regression are drawn when the state is collected (``n_alias`` per state, in the same batched base call
  as the executed chunk), and the TD target of ``Q^A`` takes the next state's value from the ``Q^W`` target
  network, ``min Q^W'(s', w')`` with ``w' ~ pi(s')``, which is what ``Q^A(s', base(s', w'))`` is regressed onto.

Both start with ``warmup_steps`` environment steps of the base's own behaviour (``w ~ N(0, I)``) before learning.
``bootstrap`` picks the next-state noise of the TD targets: ``actor`` (SAC: ``w' ~ pi(s')`` with its entropy bonus)
or ``base`` (``w' ~ N(0, I)``, no bonus): the critics then value the base's own behaviour, which the noise critic has
seen, instead of the actor's latents, where it extrapolates, and the actor takes one greedy step of improvement on
those values (as one-step offline RL does); the critic is not fed its own maximum.
Transition rewards are the discounted sums over the executed steps, discounts ``gamma^n`` (0 at termination).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from policies.base import Policy
from rl.adapters import NoiseConfig, NoisePolicy, adapter_around
from rl.env_loop import Decision, EnvLoop
from rl.methods import Method, MethodConfig, MethodContext, pack_state, register_method, unpack_state
from rl.networks import TwinQ, soft_update
from rl.replay import ReplayBuffer


@register_method("dsrl")
@dataclasses.dataclass
class DSRLConfig(MethodConfig):
    noise_bound: float = 1.5  # b
    noise_space: str = "box"  # box: the base samples from w | sphere: from w rescaled to the norm sqrt(H * Da)
    actor_hidden_dims: list[int] = dataclasses.field(default_factory=lambda: [256, 256])
    batch_size: int = 256
    buffer_size: int = 100_000  # chunk transitions (100k env steps are 12.5k of them at Ta = 8)
    utd: float = 1.0  # gradient updates per collected transition (update-to-data ratio)
    tau: float = 0.005
    init_alpha: float = 0.1
    target_entropy: float | None = None  # None: -dim(w) (SAC's default); DSRL-NA uses 0
    warmup_steps: int = 5_000  # env steps of w ~ N(0, I) before the actor acts and updates start
    bootstrap: str = "actor"  # next-state noise of the TD targets: actor (SAC) | base (w' ~ N(0, I), no bonus)
    # the adapter's evaluation (in-run and from its checkpoint): a fresh latent b * tanh(mu + std * xi) per chunk
    # (True, as DSRL evaluates) or the actor's mean latent (False). Training draws its own latents either way.
    sample_latent: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bootstrap not in ("actor", "base"):
            raise ValueError(f"bootstrap must be 'actor' or 'base', got {self.bootstrap!r}")
        if not self.noise_bound > 0:
            raise ValueError(f"noise_bound must be > 0, got {self.noise_bound}")
        for name in ("batch_size", "buffer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.utd > 0 or not 0 < self.tau <= 1 or not self.init_alpha > 0 or self.warmup_steps < 0:
            raise ValueError(
                f"need utd > 0, tau in (0, 1], init_alpha > 0, warmup_steps >= 0; got utd={self.utd}, "
                f"tau={self.tau}, init_alpha={self.init_alpha}, warmup_steps={self.warmup_steps}"
            )

    def build(self, base: Policy, loop: EnvLoop, context: MethodContext) -> DSRL:
        return DSRL(self, base, loop, context)


@register_method("dsrl_na")
@dataclasses.dataclass
class DSRLNAConfig(DSRLConfig):
    target_entropy: float | None = 0.0
    n_alias: int = 2  # (w ~ N(0, I), base(s, w)) pairs drawn per collected state for the Q^W regression
    demo_ratio: float = 0.0  # fraction of each Q^A batch taken from demonstration chunks (0: none)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_alias < 1:
            raise ValueError(f"n_alias must be >= 1, got {self.n_alias}")
        if not 0 <= self.demo_ratio < 1:
            raise ValueError(f"demo_ratio must be in [0, 1), got {self.demo_ratio}")

    def build(self, base: Policy, loop: EnvLoop, context: MethodContext) -> DSRL:
        return DSRL(self, base, loop, context)


class DSRL(Method):
    config: DSRLConfig

    def __init__(self, config: DSRLConfig, base: Policy, loop: EnvLoop, context: MethodContext) -> None:
        super().__init__(config, base, loop, context)
        self.noise_aliasing = isinstance(config, DSRLNAConfig)
        self.adapter: NoisePolicy = adapter_around(  # type: ignore[assignment]
            NoiseConfig,
            base,
            noise_bound=config.noise_bound,
            noise_space=config.noise_space,
            hidden_dims=config.actor_hidden_dims,
            sample_latent=config.sample_latent,
        )
        self.generator = torch.Generator().manual_seed(context.seed)
        a = self.adapter
        pc = a.config
        self.exec_slice = slice(pc.n_obs_steps - 1, pc.n_obs_steps - 1 + pc.n_action_steps)
        self.exec_dim = pc.n_action_steps * a.action_dim
        # Q^W (DSRL-SAC's only critic) on (s, u = w / b); Q^A on (s, executed chunk normalized).
        self.qf = TwinQ(a.input_dim, a.noise_dim, config.hidden_dims)
        self.qf_target = copy.deepcopy(self.qf).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(config.init_alpha), requires_grad=True)
        self.target_entropy = -float(a.noise_dim) if config.target_entropy is None else config.target_entropy
        self.q_optimizer = torch.optim.Adam(self.qf.parameters(), lr=config.lr)
        self.actor_optimizer = torch.optim.Adam(a.actor.parameters(), lr=config.lr)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=config.lr)
        shapes = {"x": (a.input_dim,), "u": (a.noise_dim,), "r": (), "discount": (), "x_next": (a.input_dim,)}
        if self.noise_aliasing:
            self.qa = TwinQ(a.input_dim, self.exec_dim, config.hidden_dims)
            self.qa_optimizer = torch.optim.Adam(self.qa.parameters(), lr=config.lr)
            shapes["a"] = (self.exec_dim,)
            self.alias = ReplayBuffer(
                config.buffer_size * config.n_alias, {"x": (a.input_dim,), "u": (a.noise_dim,), "a": (self.exec_dim,)}
            )
            self.demos = self._demo_transitions() if config.demo_ratio > 0 else None
        self.buffer = ReplayBuffer(config.buffer_size, shapes)
        self.obs: dict[str, torch.Tensor] | None = None
        self.updates = 0

    # -- acting -----------------------------------------------------------------------------------------------
    def executed(self, chunk: torch.Tensor) -> torch.Tensor:
        """``chunk [B, H, Da]`` raw -> the executed actions, normalized and flattened ``[B, Ta * Da]``."""
        return rearrange(self.adapter.normalizer.normalize("action", chunk[:, self.exec_slice]), "b t d -> b (t d)")

    @torch.no_grad()
    def iterate(self) -> dict[str, float]:
        """One decision for every env of the round (Ta steps each), stored, then ``utd`` updates per transition."""
        a, cfg = self.adapter, self.config
        if self.obs is None or self.loop.round_over:
            self.obs = self.loop.reset()
        obs = self.obs
        b = obs[next(iter(obs))].shape[0]
        x = a.actor_input(obs)
        if self.loop.env_steps < cfg.warmup_steps:
            w = torch.randn((b, *a.noise_shape), generator=self.generator)  # the base's own behaviour
        else:
            w, _ = a.sample_noise(obs)
        if self.noise_aliasing:
            w_alias = torch.randn((b * cfg.n_alias, *a.noise_shape), generator=self.generator)
            obs_all = {k: torch.cat([v, v.repeat_interleave(cfg.n_alias, 0)]) for k, v in obs.items()}
            chunks = a.chunk_from_noise(obs_all, torch.cat([w, w_alias]))
            chunk, alias_chunk = chunks[:b], chunks[b:]
        else:
            chunk = a.chunk_from_noise(obs, w)
        decision = self.loop.step(chunk[:, self.exec_slice])
        self.obs = decision.obs
        live = torch.as_tensor(decision.live)
        rows = self._transitions(decision, x, w / cfg.noise_bound, a.actor_input(decision.obs))
        if self.noise_aliasing:
            rows["a"] = self.executed(chunk)
            live_alias = live.repeat_interleave(cfg.n_alias)
            self.alias.add(
                x=x.repeat_interleave(cfg.n_alias, 0)[live_alias],
                u=(w_alias / cfg.noise_bound).flatten(1)[live_alias],
                a=self.executed(alias_chunk)[live_alias],
            )
        self.buffer.add(**{k: v[live] for k, v in rows.items()})
        logs: dict[str, float] = {}
        if self.loop.env_steps >= cfg.warmup_steps:
            n_updates = max(1, round(cfg.utd * int(live.sum())))
            with torch.enable_grad():
                for _ in range(n_updates):
                    logs = self.update(self.buffer.sample(cfg.batch_size, self.generator))
        return logs

    def _transitions(
        self, decision: Decision, x: torch.Tensor, u: torch.Tensor, x_next: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        gamma = self.config.gamma
        discount = gamma ** torch.as_tensor(decision.n_steps, dtype=torch.float32)
        discount = discount * torch.as_tensor(~decision.terminated, dtype=torch.float32)
        r = torch.as_tensor(decision.discounted_reward(gamma), dtype=torch.float32)
        return {"x": x, "u": u.flatten(1), "r": r, "discount": discount, "x_next": x_next}

    # -- learning ---------------------------------------------------------------------------------------------
    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One SAC step (DSRL-SAC), or one DSRL-NA step (Q^A TD, Q^W regression, actor on Q^W)."""
        a, cfg = self.adapter, self.config
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            min_qf_next_target = self._next_value(batch["x_next"], alpha)
        logs: dict[str, float] = {}
        if self.noise_aliasing:
            qa_batch = self._with_demos(batch)
            with torch.no_grad():
                if qa_batch is not batch:  # demonstration rows need their own next-state values
                    min_qf_next_target = self._next_value(qa_batch["x_next"], alpha)
                next_q_value = qa_batch["r"] + qa_batch["discount"] * min_qf_next_target
            qa1, qa2 = self.qa(qa_batch["x"], qa_batch["a"])
            qa_loss = F.mse_loss(qa1, next_q_value) + F.mse_loss(qa2, next_q_value)
            self.qa_optimizer.zero_grad()
            qa_loss.backward()
            self.qa_optimizer.step()
            # Noise aliasing: Q^W(s, w) <- Q^A(s, base(s, w)), w ~ N(0, I) (pairs drawn at collection).
            alias = self.alias.sample(cfg.batch_size, self.generator)
            with torch.no_grad():
                target = torch.min(*self.qa(alias["x"], alias["a"]))
            qf1, qf2 = self.qf(alias["x"], alias["u"])
            qf_loss = F.mse_loss(qf1, target) + F.mse_loss(qf2, target)
            logs["train/qa_loss"] = qa_loss.item()
            logs["train/qa_values"] = qa1.mean().item()
        else:
            next_q_value = batch["r"] + batch["discount"] * min_qf_next_target
            qf1, qf2 = self.qf(batch["x"], batch["u"])
            qf_loss = F.mse_loss(qf1, next_q_value) + F.mse_loss(qf2, next_q_value)
        self.q_optimizer.zero_grad()
        qf_loss.backward()
        self.q_optimizer.step()

        u_pi, log_pi = a.actor.sample(batch["x"])
        qf1_pi, qf2_pi = self.qf(batch["x"], u_pi)
        actor_loss = (alpha * log_pi - torch.min(qf1_pi, qf2_pi)).mean()
        self.actor_optimizer.zero_grad()
        actor_loss.backward()
        self.actor_optimizer.step()
        alpha_loss = (-self.log_alpha.exp() * (log_pi.detach() + self.target_entropy)).mean()
        self.alpha_optimizer.zero_grad()
        alpha_loss.backward()
        self.alpha_optimizer.step()

        soft_update(self.qf_target, self.qf, cfg.tau)
        self.updates += 1
        return logs | {
            "train/qf_loss": qf_loss.item(),
            "train/qf_values": qf1.mean().item(),
            "train/actor_loss": actor_loss.item(),
            "train/alpha": alpha.item(),
            "train/entropy": -log_pi.mean().item(),
            "train/updates": float(self.updates),
        }

    def _next_value(self, x_next: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Soft value of the next states ``[B]`` from the noise critic's target network: at the actor's noise with
        its entropy bonus (``bootstrap=actor``), or at the base's own ``w' ~ N(0, I)`` (``bootstrap=base``)."""
        if self.config.bootstrap == "base":
            w = torch.randn((len(x_next), self.adapter.noise_dim), generator=self.generator)
            return torch.min(*self.qf_target(x_next, w / self.config.noise_bound))
        u_next, log_pi_next = self.adapter.actor.sample(x_next)
        return torch.min(*self.qf_target(x_next, u_next)) - alpha * log_pi_next

    # -- demonstrations (DSRL-NA) -----------------------------------------------------------------------------
    def _demo_transitions(self) -> dict[str, torch.Tensor]:
        """Every demonstration window as a chunk transition ``(x, a, r, discount, x_next)`` in this run's reward
        convention (``rl.env_loop``): rewards from the recorded states' coverage."""
        task = self.context.task
        if task is None:
            raise ValueError("demo_ratio > 0 needs the task's demonstrations (MethodContext.task)")
        pc = self.adapter.config
        train_set, _ = task.datasets(pc.horizon, pc.n_obs_steps, pc.n_action_steps, transitions=True)
        loader = torch.utils.data.DataLoader(train_set, batch_size=1024)
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("x", "a", "r", "discount", "x_next")}
        gamma = self.config.gamma
        with torch.no_grad():
            for batch in loader:
                reward, terminal = batch["reward"], batch["terminal"]  # [B, Ta]: eval reward, state terminal
                reward = reward - 1.0 if self.loop.reward == "dense" else terminal
                alive = torch.cumprod(1 - terminal, dim=1)  # steps after a terminal state are not taken
                alive_before = torch.cat([torch.ones_like(alive[:, :1]), alive[:, :-1]], dim=1)
                powers = gamma ** torch.arange(reward.shape[1], dtype=torch.float32)
                parts["r"].append((reward * alive_before * powers).sum(1))
                parts["discount"].append(gamma ** reward.shape[1] * alive[:, -1])
                parts["x"].append(self.adapter.actor_input(batch["obs"]))
                parts["x_next"].append(self.adapter.actor_input(batch["next_obs"]))
                parts["a"].append(
                    rearrange(
                        self.adapter.normalizer.normalize("action", batch["action"][:, self.exec_slice]),
                        "b t d -> b (t d)",
                    )
                )
        return {k: torch.cat(v) for k, v in parts.items()}

    def _with_demos(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` with its first ``demo_ratio`` share of rows replaced by demonstration chunks."""
        if self.demos is None:
            return batch
        n_demo = int(round(self.config.demo_ratio * len(batch["r"])))
        idx = torch.randint(0, len(self.demos["r"]), (n_demo,), generator=self.generator)
        return {k: torch.cat([self.demos[k][idx], v[n_demo:]]) for k, v in batch.items() if k in self.demos}

    # -- resume -------------------------------------------------------------------------------------------------
    def _parts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        modules: dict[str, Any] = {"qf": self.qf, "qf_target": self.qf_target}
        optimizers: dict[str, Any] = {
            "q_optimizer": self.q_optimizer,
            "actor_optimizer": self.actor_optimizer,
            "alpha_optimizer": self.alpha_optimizer,
        }
        if self.noise_aliasing:
            modules["qa"] = self.qa
            optimizers["qa_optimizer"] = self.qa_optimizer
        return modules, optimizers

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = pack_state(*self._parts())
        buf_tensors, meta["buffer"] = self.buffer.state("buffer")
        tensors |= buf_tensors | {"log_alpha": self.log_alpha.detach().clone(), "generator": self.generator.get_state()}
        if self.noise_aliasing:
            alias_tensors, meta["alias"] = self.alias.state("alias")
            tensors |= alias_tensors
        meta["updates"] = self.updates
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        unpack_state(tensors, meta, *self._parts())
        self.buffer.load_state("buffer", tensors, meta["buffer"])
        if self.noise_aliasing:
            self.alias.load_state("alias", tensors, meta["alias"])
        with torch.no_grad():
            self.log_alpha.copy_(tensors["log_alpha"])
        self.generator.set_state(tensors["generator"])
        self.updates = int(meta["updates"])
