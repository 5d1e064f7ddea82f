"""DPPO: PPO on the last denoising steps of a copy of a diffusion policy (Ren et al. 2024, "Diffusion Policy Policy
Optimization").

The denoising chain is an inner MDP: each of the last ``K = ft_denoising_steps`` denoising steps is a Gaussian policy
step ``x_{k+1} ~ N(mu_theta(x_k, t_k, s), sigma^2)`` (DPPO sec. 4.1), where ``mu_theta`` is the DDIM (eta 0) update of
``policies.schedulers.DDPMSchedule.step`` and ``sigma = min_std`` in normalized action units: the posterior std of
DDIM with eta 0 is 0, clamped below by DPPO's floor (``min_sampling_denoising_std = min_logprob_denoising_std``;
with DDIM-10 the last step to the clean level has zero variance even at eta 1, so the floor is what makes it a
policy). The earlier steps are the deterministic DDIM steps of the same network, so the chain is the adapter's own
sampler with noise in its last K steps, and the adapter at evaluation (``predict_action_chunk``, eta 0 throughout)
is the chain's mean. The environment MDP is chunk-level: one decision runs the executed part
``chunk[:, To-1 : To-1+Ta]``; its reward is the discounted sum over the executed steps, GAE (Schulman et al. 2016)
over decisions with discount ``gamma^n_steps``, a value network on the frozen base's observation features.

Conventions from DPPO's code: each (decision, denoising step) pair is a PPO sample with its own ratio, the
log-probability is the mean over the executed actions' dimensions, and the advantage of denoising step k
(0 = the first fine-tuned one) is discounted by ``gamma_denoising^(K-1-k)``.

The actor is ``copy.deepcopy(base)`` with gradients on; the base stays frozen and bit-identical. The adapter is that
copy: a plain policy of the base's type, saved and loaded like the base.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import numpy as np
import torch
from einops import rearrange

from policies.base import Policy
from policies.ddpm import DDPMPolicy
from rl.adapters import freeze
from rl.env_loop import Decision, EnvLoop
from rl.methods import Method, MethodConfig, MethodContext, pack_state, unpack_state
from rl.networks import MLP


@dataclasses.dataclass
class DPPOConfig(MethodConfig):
    """``hidden_dims`` and ``lr`` are the value network's; ``actor_lr`` the fine-tuned denoiser's."""

    ft_denoising_steps: int = 2  # K: the last K denoising steps are the policy's steps
    min_std: float = 0.1  # floor on the denoising std, normalized action units (DPPO: 0.1)
    actor_lr: float = 1e-5
    gae_lambda: float = 0.95
    gamma_denoising: float = 0.99
    clip_coef: float = 0.01  # PPO clip on the per-step ratio (DPPO's clip_ploss_coef)
    update_epochs: int = 4
    minibatch_size: int = 128  # (decision, denoising step) samples per gradient step
    max_grad_norm: float = 1.0
    # Rounds whose update trains the value network only (DPPO's n_critic_warmup_itr): advantages from an untrained
    # critic are noise, and Adam turns noise into full-size steps of every denoiser weight.
    critic_warmup_rounds: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("ft_denoising_steps", "update_epochs", "minibatch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.critic_warmup_rounds < 0:
            raise ValueError(f"critic_warmup_rounds must be >= 0, got {self.critic_warmup_rounds}")
        for name in ("min_std", "actor_lr", "clip_coef", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("gae_lambda", "gamma_denoising"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    def build(self, base: Policy, loop: EnvLoop, context: MethodContext) -> DPPO:
        return DPPO(self, base, loop, context)


class DPPO(Method):
    config: DPPOConfig

    def __init__(self, config: DPPOConfig, base: Policy, loop: EnvLoop, context: MethodContext) -> None:
        super().__init__(config, base, loop, context)
        if not isinstance(base, DDPMPolicy):
            raise ValueError(
                f"DPPO fine-tunes a DDPM/DDIM denoising chain; base policy '{base.config.type}' is not one"
            )
        n_steps = base.config.num_inference_steps
        if config.ft_denoising_steps > n_steps:
            raise ValueError(
                f"ft_denoising_steps must be <= the base's num_inference_steps ({n_steps}), "
                f"got {config.ft_denoising_steps}"
            )
        freeze(base)  # only the copy learns
        self.actor = copy.deepcopy(base).requires_grad_(True)  # eval mode stays: no dropout in rollouts
        self.adapter = self.actor
        levels = self.actor.schedule.timesteps(n_steps)
        self.pairs = list(zip(levels, [*levels[1:], -1], strict=True))  # (t, t_prev) of every denoising step
        self.first_ft = n_steps - config.ft_denoising_steps
        pc = base.config
        self.exec_slice = slice(pc.n_obs_steps - 1, pc.n_obs_steps - 1 + pc.n_action_steps)
        self.value = MLP(pc.n_obs_steps * base.obs_feature_dim, config.hidden_dims, 1).to(self.device)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
        self.value_optimizer = torch.optim.Adam(self.value.parameters(), lr=config.lr)
        self.generator = torch.Generator(self.device).manual_seed(context.seed)
        self.rounds = 0
        self.updates = 0  # actor updates

    # -- the denoising chain as a policy ----------------------------------------------------------------------
    def value_input(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``obs {k: [B, To, ...]}`` raw -> the frozen base's flattened features ``[B, To * F]``."""
        with torch.no_grad():
            return rearrange(self.base.obs_features(obs), "b t f -> b (t f)")

    def step_mean(self, cond: torch.Tensor, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The mean of fine-tuned step ``k [N]`` (0 = the first of the K) from ``x [N, H, Da]``: the DDIM update."""
        levels = torch.tensor(self.pairs[self.first_ft :], device=x.device)[k]  # [N, 2]: (t, t_prev)
        eps = self.actor.denoise(x, levels[:, 0], cond)
        return self.actor.schedule.step(x, eps, levels[:, 0], levels[:, 1])

    def log_prob(self, mean: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
        """``log N(x_next; mean, min_std^2)`` averaged over the executed actions' dimensions: ``[N, H, Da] -> [N]``."""
        z = (x_next - mean)[:, self.exec_slice] / self.config.min_std
        return (-0.5 * z.pow(2) - math.log(self.config.min_std) - 0.5 * math.log(2 * math.pi)).mean((1, 2))

    @torch.no_grad()
    def sample_chain(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``obs {k: [B, To, ...]}`` -> ``(chunk [B, H, Da] raw, chain [B, K+1, H, Da] normalized, log_prob [B, K])``:
        deterministic DDIM steps, then K Gaussian steps around the DDIM mean."""
        actor = self.actor
        b = actor.check_obs(obs)
        cond = actor.encode_obs(obs)
        x = torch.randn((b, actor.config.horizon, actor.action_dim), generator=self.generator, device=self.device)
        chain, log_probs = [], []
        for i, (t, t_prev) in enumerate(self.pairs):
            if i < self.first_ft:
                x = actor.schedule.step(x, actor.denoise(x, torch.full((b,), t, device=self.device), cond), t, t_prev)
                continue
            chain.append(x)
            mean = self.step_mean(cond, x, torch.full((b,), i - self.first_ft, device=self.device))
            x = mean + self.config.min_std * torch.randn(x.shape, generator=self.generator, device=self.device)
            log_probs.append(self.log_prob(mean, x))
        chain.append(x)
        # DPPO clips the final sample to the action range, as the sampler clips its clean prediction.
        r = actor.schedule.clip_sample_range
        chunk = actor.normalizer.unnormalize("action", x.clamp(-r, r))
        return chunk, torch.stack(chain, 1), torch.stack(log_probs, 1)

    # -- collect a round, then PPO --------------------------------------------------------------------------------
    def iterate(self) -> dict[str, float]:
        """One round of the loop's episodes under the stochastic chain, then ``update_epochs`` of PPO on it (of the
        value network only during the critic warm-up)."""
        rollout = self.collect_round()
        self.rounds += 1
        return self.update(rollout, train_actor=self.rounds > self.config.critic_warmup_rounds)

    @torch.no_grad()
    def collect_round(self) -> dict[str, Any]:
        obs = self.loop.reset()
        steps: list[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, Decision]] = []
        while not self.loop.round_over:
            chunk, chain, log_prob = self.sample_chain(obs)
            decision = self.loop.step(chunk[:, self.exec_slice])
            steps.append((obs, chain, log_prob, decision))
            obs = decision.obs
        gamma = self.config.gamma

        def stack(fn: Any) -> torch.Tensor:  # [T, B] from a per-decision numpy quantity
            return torch.as_tensor(np.stack([fn(d) for *_, d in steps]), dtype=torch.float32, device=self.device)

        return {
            "obs": {k: torch.stack([o[k] for o, *_ in steps]) for k in obs},  # {k: [T, B, To, ...]}
            "chain": torch.stack([c for _, c, *_ in steps]),  # [T, B, K+1, H, Da]
            "log_prob": torch.stack([lp for _, _, lp, _ in steps]),  # [T, B, K]
            "values": torch.stack([self.value(self.value_input(o)).squeeze(-1) for o, *_ in steps]),  # [T, B]
            "next_values": torch.stack([self.value(self.value_input(d.obs)).squeeze(-1) for *_, d in steps]),
            "rewards": stack(lambda d: d.discounted_reward(gamma)),
            "discounts": stack(lambda d: gamma**d.n_steps),
            "terminated": stack(lambda d: d.terminated),
            "done": stack(lambda d: d.done),
            "live": stack(lambda d: d.live).bool(),
        }

    def advantages(self, rollout: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE over decisions ``[T, B]``; a terminated episode has no bootstrap, a truncated one bootstraps from the
        value of its last observation, and no advantage flows across an episode's end. Returns (advantages,
        returns)."""
        r, disc, values = rollout["rewards"], rollout["discounts"], rollout["values"]
        next_values = rollout["next_values"] * (1 - rollout["terminated"])
        advantages = torch.zeros_like(r)
        lastgaelam = torch.zeros_like(r[0])
        for t in reversed(range(len(r))):
            delta = r[t] + disc[t] * next_values[t] - values[t]
            lastgaelam = delta + disc[t] * self.config.gae_lambda * (1 - rollout["done"][t]) * lastgaelam
            advantages[t] = lastgaelam
        return advantages, advantages + values

    def update(self, rollout: dict[str, Any], train_actor: bool = True) -> dict[str, float]:
        cfg, k_steps = self.config, self.config.ft_denoising_steps
        advantages, returns = self.advantages(rollout)
        live = rollout["live"].flatten()  # [T * B]
        obs = {k: v.flatten(0, 1)[live] for k, v in rollout["obs"].items()}  # {k: [N, To, ...]}
        chain, old_log_prob = rollout["chain"].flatten(0, 1)[live], rollout["log_prob"].flatten(0, 1)[live]
        advantages, returns = advantages.flatten()[live], returns.flatten()[live]
        value_input = self.value_input(obs)
        n = len(returns)
        clipfracs, logs = [], {}
        for _ in range(cfg.update_epochs):
            perm = torch.randperm(n * k_steps, generator=self.generator, device=self.device)
            for start in range(0, n * k_steps, cfg.minibatch_size):
                mb = perm[start : start + cfg.minibatch_size]
                i, k = mb // k_steps, mb % k_steps  # decision, fine-tuned denoising step
                cond = self.actor.encode_obs({key: v[i] for key, v in obs.items()})
                new_log_prob = self.log_prob(self.step_mean(cond, chain[i, k], k), chain[i, k + 1])
                logratio = new_log_prob - old_log_prob[i, k]
                ratio = logratio.exp()
                mb_advantages = advantages[i]
                if len(mb) > 1:
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
                mb_advantages = mb_advantages * cfg.gamma_denoising ** (k_steps - 1 - k)
                pg_loss1 = -mb_advantages * ratio
                pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - cfg.clip_coef, 1 + cfg.clip_coef)
                pg_loss = torch.max(pg_loss1, pg_loss2).mean()
                v_loss = 0.5 * (self.value(value_input[i]).squeeze(-1) - returns[i]).pow(2).mean()
                self.actor_optimizer.zero_grad()
                self.value_optimizer.zero_grad()
                (pg_loss + v_loss if train_actor else v_loss).backward()
                torch.nn.utils.clip_grad_norm_(self.value.parameters(), cfg.max_grad_norm)
                self.value_optimizer.step()
                if train_actor:
                    torch.nn.utils.clip_grad_norm_(self.actor.parameters(), cfg.max_grad_norm)
                    self.actor_optimizer.step()
                    self.updates += 1
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - logratio).mean()  # Schulman's k3 estimator
                    clipfracs.append(((ratio - 1.0).abs() > cfg.clip_coef).float().mean().item())
                logs = {
                    "train/pg_loss": pg_loss.item(),
                    "train/v_loss": v_loss.item(),
                    "train/approx_kl": approx_kl.item(),
                }
        return logs | {
            "train/clipfrac": float(np.mean(clipfracs)) if clipfracs else 0.0,
            "train/return": returns.mean().item() if n else 0.0,
            "train/updates": float(self.updates),
        }

    # -- resume -------------------------------------------------------------------------------------------------
    def _parts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"value": self.value}, {"actor_optimizer": self.actor_optimizer, "value_optimizer": self.value_optimizer}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The value network and both optimizers (the actor's weights are the adapter's, saved by the runner)."""
        tensors, meta = pack_state(*self._parts())
        return tensors | {"generator": self.generator.get_state()}, meta | {
            "rounds": self.rounds,
            "updates": self.updates,
        }

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        unpack_state(tensors, meta, *self._parts())
        self.generator.set_state(tensors["generator"])
        self.rounds, self.updates = int(meta["rounds"]), int(meta["updates"])
