"""Streaming Diffusion Policy (Høeg, Du & Egeland 2024, "Streaming Diffusion Policy: Fast Policy Synthesis with
Variable Noise Diffusion Models"; TEDi, Zhang et al. 2024): Diffusion Policy's UNet trained with one noise level per
action, so that a rolling action buffer can hold a clean first chunk and increasingly noisy later chunks.

Time convention: DDPM levels of ``policies.schedulers`` (k = 0 clean .. K-1 noisiest, epsilon prediction); -1 is the
clean sample. Inference uses the N levels ``L = schedule.timesteps(N)`` (descending); "stage" l = 0 .. N-1 names
level ``L[N-1-l]`` (stage N-1 = pure noise, K-1) and stage -1 the clean sample.

Buffer layout (H = horizon, To = n_obs_steps, Ta = n_action_steps): position p belongs to chunk
``c(p) = clamp((p - (To-1)) // Ta, 0, h-1)`` with ``h = (H - (To-1)) // Ta`` chunks; positions before To-1 (the past
steps aligned with older observations) join chunk 0 and a remainder at the end joins chunk h-1. With s = N / h
denoiser passes per observation, chunk c waits at stage (c+1) s - 1 before the passes and reaches c s - 1 after them:
chunk 0 is clean and its Ta actions are executed. Shifting the buffer by Ta then moves chunk c+1 into chunk c's slot
at exactly the stage chunk c needs, fresh noise (stage N-1) fills the last chunk, and the past positions, which now
hold clean executed actions, are re-noised to chunk 0's stage (the model was trained with them at that level).
Each update goes from one position's level to the next listed level with the DDIM (eta=0) or DDPM-posterior (eta=1)
step between the two actual noise levels, per action (``DDPMSchedule.step`` with [B, H] levels), so the DDPM and
DDIM paths differ only in eta.

The policy stays stateless: ``stream(obs, buffer)`` takes the previous buffer and returns the new one; the chunk
executor (``envs.executor.StreamingExecutor``) owns it between control steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor

from policies.diffusion_unet import DiffusionUnetConfig, DiffusionUnetPolicy
from policies.registry import register_policy


def chunk_index(horizon: int, n_obs_steps: int, n_action_steps: int) -> Tensor:
    """``[H]`` chunk of every buffer position (see the module docstring)."""
    h = (horizon - (n_obs_steps - 1)) // n_action_steps
    p = torch.arange(horizon)
    return ((p - (n_obs_steps - 1)).div(n_action_steps, rounding_mode="floor")).clamp(0, h - 1)


@register_policy("streaming")
@dataclasses.dataclass
class StreamingConfig(DiffusionUnetConfig):
    # Ta = 5 with H = 16 and To = 2 gives h = 3 chunks that tile the horizon exactly (1 past step + 3 x 5), and
    # N = 6 stages make s = 2 denoiser passes per observation, i.e. 0.4 passes per executed action (DDIM-10 with
    # Ta = 8: 1.25).
    n_action_steps: int = 5
    num_inference_steps: int = 6
    # Training mixes the two noise-level patterns (the paper's ablation favours mostly chunk-wise levels).
    constant_level_prob: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.constant_level_prob <= 1.0:
            raise ValueError(f"constant_level_prob must be in [0, 1], got {self.constant_level_prob}")
        h = (self.horizon - (self.n_obs_steps - 1)) // self.n_action_steps
        if h < 1:
            raise ValueError(f"horizon {self.horizon} must hold at least one chunk of n_action_steps after To-1")
        if self.num_inference_steps % h:
            raise ValueError(
                f"num_inference_steps must be divisible by the number of chunks h = (horizon - (n_obs_steps - 1)) "
                f"// n_action_steps = {h}, got {self.num_inference_steps}"
            )
        if self.num_train_timesteps < h:
            raise ValueError(f"num_train_timesteps must be >= the number of chunks {h}, got {self.num_train_timesteps}")

    def build(self, shape_meta: Mapping) -> StreamingPolicy:
        return StreamingPolicy(self, shape_meta)


class StreamingPolicy(DiffusionUnetPolicy):
    config: StreamingConfig
    default_executor = "streaming"  # evaluate() drives it through the rolling buffer unless told otherwise
    chunk: Tensor  # [H] chunk index of each position
    stage_levels: Tensor  # [N + 1]: DDPM level of stage l at index l + 1 (index 0: clean, -1)

    def __init__(self, config: StreamingConfig, shape_meta: Mapping) -> None:
        super().__init__(config, shape_meta)
        c = config
        self.register_buffer("chunk", chunk_index(c.horizon, c.n_obs_steps, c.n_action_steps), persistent=False)
        self.n_chunks = int(self.chunk.max()) + 1
        self.passes_per_observation = c.num_inference_steps // self.n_chunks
        levels = self.schedule.timesteps(c.num_inference_steps)[::-1]  # ascending: stage l -> levels[l]
        self.register_buffer("stage_levels", torch.tensor([-1, *levels]), persistent=False)

    # -- training --------------------------------------------------------------------------------------------
    def training_levels(self, b: int, device: torch.device) -> Tensor:
        """``[B, H]`` DDPM levels: with probability ``constant_level_prob`` one level for the whole chunk (as DP),
        else chunk-wise increasing levels k(p) = floor(K (c(p) + 1) / h) - 1 - j with one j ~ U{0 .. K/h - 1} per
        sample, the levels the rolling buffer passes through (the Streaming DP paper's chunk-wise scheme)."""
        K, h = self.config.num_train_timesteps, self.n_chunks
        constant = torch.randint(0, K, (b, 1), device=device).expand(b, self.config.horizon)
        j = torch.randint(0, K // h, (b, 1), device=device)
        chunkwise = torch.div(K * (self.chunk.to(device) + 1), h, rounding_mode="floor") - 1 - j  # [B, H]
        use_constant = torch.rand(b, 1, device=device) < self.config.constant_level_prob
        return torch.where(use_constant, constant, chunkwise)

    def compute_loss(self, batch: Mapping) -> tuple[Tensor, dict[str, float]]:
        b = self.check_batch(batch)
        cond = self.encode_obs(batch["obs"])
        action = self.normalizer.normalize("action", batch["action"])  # [B, H, Da]
        noise = torch.randn_like(action)
        t = self.training_levels(b, action.device)  # [B, H]
        loss = F.mse_loss(self.denoise(self.schedule.add_noise(action, noise, t), t, cond), noise)
        return loss, {"loss": loss.detach()}

    # -- streaming inference ---------------------------------------------------------------------------------
    def _stages_before(self) -> Tensor:
        """``[H]`` stage of every position before an observation's passes: (c + 1) s - 1."""
        return (self.chunk + 1) * self.passes_per_observation - 1

    def _denoise_passes(self, x: Tensor, stage: Tensor, cond: Tensor, generator: torch.Generator | None) -> Tensor:
        """``x [B, H, Da]`` at per-position ``stage [H]`` -> after s passes (every position s stages lower)."""
        eta = 1.0 if self.config.sampler == "ddpm" else 0.0
        b = x.shape[0]
        for _ in range(self.passes_per_observation):
            t = repeat(self.stage_levels[stage + 1], "h -> b h", b=b)
            t_prev = repeat(self.stage_levels[stage], "h -> b h", b=b)
            x = self.schedule.step(x, self.denoise(x, t, cond), t, t_prev, eta=eta, generator=generator)
            stage = stage - 1
        return x

    def _renoise(self, x0: Tensor, stage: Tensor, generator: torch.Generator | None) -> Tensor:
        """Clean ``x0 [B, H, Da]`` -> q(x_k | x0) at each position's stage ``[H]`` (stage -1 stays clean)."""
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = repeat(self.stage_levels[stage + 1], "h -> b h", b=x0.shape[0])
        noisy = self.schedule.add_noise(x0, noise, t.clamp(min=0))
        return torch.where((stage >= 0)[None, :, None], noisy, x0)

    @torch.no_grad()
    def stream(
        self,
        obs: Mapping[str, Tensor],
        buffer: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One observation of streaming inference: ``obs {k: [B, To, ...]}``, the buffer returned by the previous
        call (``None`` at an episode start) -> ``(chunk [B, H, Da] raw units, buffer [B, H, Da] normalized)``.

        ``chunk[:, To-1 : To-1+Ta]`` is clean and is what the executor runs; later positions are still noisy.
        An episode start samples the whole chunk once (N DDIM/DDPM passes, as ``predict_action_chunk``) and noises
        chunk c back to stage c s - 1, the state the buffer is in after every later observation's s passes.
        """
        b = self.check_obs(obs)
        c = self.config
        cond = self.encode_obs(obs)
        after = self._stages_before() - self.passes_per_observation  # [H] stage after the passes: c s - 1
        if buffer is None:
            noise = self.initial_noise(b, None, cond.device, generator)
            x0 = self.schedule.sample(
                lambda x, t: self.denoise(x, t, cond),
                noise,
                self.schedule.timesteps(c.num_inference_steps),
                eta=1.0 if c.sampler == "ddpm" else 0.0,
                generator=generator,
            )
            x = self._renoise(x0, after, generator)
        else:
            if list(buffer.shape) != [b, c.horizon, self.action_dim]:
                raise ValueError(f"buffer has shape {list(buffer.shape)}, expected {[b, c.horizon, self.action_dim]}")
            x = self._shift(buffer, generator)
            x = self._denoise_passes(x, self._stages_before(), cond, generator)
        return self.normalizer.unnormalize("action", x), x

    def _shift(self, buffer: Tensor, generator: torch.Generator | None) -> Tensor:
        """After executing chunk 0: drop Ta steps, fresh noise into the last chunk, re-noise the past positions."""
        c = self.config
        stage = self._stages_before()
        fresh = torch.randn(buffer.shape, generator=generator, device=buffer.device, dtype=buffer.dtype)
        shifted = buffer.roll(-c.n_action_steps, dims=1)
        # The last chunk (Ta + remainder positions) restarts from pure noise: its slot held chunk 0's executed steps
        # after the roll, and a remainder's part-denoised steps would sit at the wrong stage.
        last = (self.chunk == self.n_chunks - 1)[None, :, None]
        x = torch.where(last, fresh, shifted)
        past = (torch.arange(c.horizon, device=buffer.device) < c.n_obs_steps - 1)[None, :, None]
        return torch.where(past, self._renoise(shifted, stage, generator), x)
