"""MoDE denoiser transformer (Reuss et al., ICLR 2025, "Efficient Diffusion Transformer Policies with Mixture of
Expert Denoisers for Multitask Learning"): a transformer over action tokens whose feed-forward layers are sparse
mixtures of SwiGLU experts routed by the noise level only.

Layout, following the paper (Fig. 1, sec. 3): one encoder-only transformer over the token sequence
    [noise token, task token, obs tokens (To, one per step), action tokens (H)]        -> [B, 2 + To + H, D]
with learned position embeddings and causal self-attention (the paper's "transformer with causal masking"; the
released code's blocks build their attention unmasked, we follow the paper; `causal=False` gives full attention).
The conditioning tokens come first, so every action token sees all of the conditioning and the earlier actions.
F is read off the action tokens. Each block is pre-norm (RMSNorm) and
    x = x + Attn(RMSNorm(x) + phi(sigma))          noise-conditioned self-attention: the noise embedding phi is
                                                   added to every token (MoDE sec. 3.1), q/k RMS-normalised
    x = x + MoE(RMSNorm(x); phi(sigma))            top-k of E SwiGLU experts (Shazeer 2020)
phi(sigma) = MLP(sinusoidal(c_noise)), c_noise = ln(sigma) / 4 (EDM). The router of every MoE layer is a linear map
of phi(sigma) ONLY (MoDE's noise-conditioned routing, sec. 3.2; the released code uses a small MLP router, phi is
already an MLP output here), so all tokens of a sample share their experts and,
at a fixed sampling level, so does the whole batch. Top-k weights are the renormalised top-k softmax
probabilities. Routing is the deterministic top-k in training too (the released code samples experts in training;
deterministic routing keeps the training forward identical to the uncached sampling forward).

Expert caching (MoDE sec. 3.3): because the routing depends only on sigma and the sampling levels are fixed,
`fuse_level` precomputes for one level the noise embedding, per layer the attention's qkv bias W_qkv phi(sigma)
(phi is added to the attention input) and the chosen experts merged into ONE SwiGLU of width k * hidden: with the
W1/W3 rows of the chosen experts concatenated and each W2 scaled by its gate,
    sum_j g_j W2_j (silu(W1_j x) * W3_j x) = [g_1 W2_1 ... g_k W2_k] (silu([W1_1; ..] x) * [W3_1; ..] x)
exactly, so a cached step runs no noise MLP, no router, no dispatch and one matmul pair per expert layer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from policies.networks.unet1d import SinusoidalPosEmb


class Routing(NamedTuple):
    """One router decision per sample: probs [B, E] (softmax), weights [B, k] (renormalised top-k), experts [B, k]."""

    probs: Tensor
    weights: Tensor
    experts: Tensor


class FusedExperts(NamedTuple):
    """The k chosen experts of one layer merged into one SwiGLU: w13 [2 * k * h, D] (gate rows, then up rows),
    w2 [D, k * h] (columns scaled by the gate weights)."""

    w13: Tensor
    w2: Tensor


class CachedLevel(NamedTuple):
    """Everything in the network that depends only on one sampling level: the noise embedding emb [1, D] (the
    noise token), per layer the attention's qkv bias W_qkv phi(sigma) [3D] and the FusedExperts."""

    emb: Tensor
    qkv_bias: list[Tensor]
    experts: list[FusedExperts]


def swiglu(x: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """SwiGLU feed-forward (Shazeer 2020): W2 (silu(W1 x) * W3 x). x: [..., D], w13: [2h, D] = [W1; W3],
    w2: [D, h] -> [..., D]."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def load_balancing_loss(probs: Tensor, experts: Tensor) -> Tensor:
    """Switch Transformer auxiliary loss (Fedus et al. 2022, eq. 4-6): N * sum_i f_i P_i, with f_i the fraction of
    the (token, slot) assignments that go to expert i (divided by k so that sum_i f_i = 1) and P_i the mean router
    probability of expert i. Every token of a sample has its sample's routing, so per-sample means equal per-token
    means. probs: [B, E], experts: [B, k] -> scalar; equals 1 for a uniform router, up to N / k when collapsed."""
    n, k = probs.shape[-1], experts.shape[-1]
    f = F.one_hot(experts, n).sum(dim=1).to(probs.dtype).mean(dim=0) / k  # [E]
    return n * (f * probs.mean(dim=0)).sum()


class NoiseRoutedMoE(nn.Module):
    """E SwiGLU experts (weights stacked: w13 [E, 2h, D], w2 [E, D, h]) and a router that reads the noise
    embedding only."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.hidden_dim, self.top_k = hidden_dim, top_k
        self.router = nn.Linear(dim, num_experts)
        # nn.Linear's default init (uniform +-1/sqrt(fan_in)) for every expert
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * hidden_dim, dim).uniform_(-1, 1) / math.sqrt(dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim).uniform_(-1, 1) / math.sqrt(hidden_dim))

    def route(self, emb: Tensor) -> Routing:
        """emb: [B, D] noise embedding -> Routing with [B, E] / [B, k] tensors."""
        probs = self.router(emb).softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return Routing(probs, weights / weights.sum(dim=-1, keepdim=True), experts)

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        """Sparse dispatch: each expert runs on the samples that chose it. x: [B, S, D] -> [B, S, D]."""
        out = torch.zeros_like(x)
        for e in range(self.w13.shape[0]):
            rows, slot = (routing.experts == e).nonzero(as_tuple=True)
            if rows.numel():
                y = swiglu(x[rows], self.w13[e], self.w2[e]) * routing.weights[rows, slot, None, None]
                out.index_add_(0, rows, y)
        return out

    def fuse(self, weights: Tensor, experts: Tensor) -> FusedExperts:
        """One routing decision (weights, experts: [k]) -> the chosen experts as one SwiGLU of width k * h."""
        h = self.hidden_dim
        w13 = self.w13[experts]  # [k, 2h, D]
        gate = rearrange(w13[:, :h], "k h d -> (k h) d")
        up = rearrange(w13[:, h:], "k h d -> (k h) d")
        w2 = rearrange(self.w2[experts] * weights[:, None, None], "k d h -> d (k h)")
        return FusedExperts(torch.cat([gate, up]).contiguous(), w2.contiguous())


class Attention(nn.Module):
    """Multi-head self-attention with RMS-normalised queries and keys (as MoDE's released blocks)."""

    def __init__(self, dim: int, n_heads: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.n_heads, self.dropout, self.causal = n_heads, dropout, causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        # RMSNorm gains of q and k (one normalisation call for both: [2, 1, head_dim] broadcasts over heads)
        self.qk_norm_weight = nn.Parameter(torch.ones(2, 1, dim // n_heads))
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, qkv_bias: Tensor | None = None) -> Tensor:
        """x: [B, S, D], qkv_bias: [3D] -> [B, S, D]."""
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        qkv = rearrange(qkv, "b s (three h d) -> b h three s d", three=3, h=self.n_heads)
        qk = F.rms_norm(qkv[:, :, :2], (qkv.shape[-1],), eps=1e-6) * self.qk_norm_weight
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2], dropout_p=dropout, is_causal=self.causal
        )
        return self.proj(rearrange(y, "b h s d -> b s (h d)"))


class MoDEBlock(nn.Module):
    def __init__(
        self, dim: int, n_heads: int, hidden_dim: int, num_experts: int, top_k: int, dropout: float, causal: bool
    ) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=1e-6)
        self.attn = Attention(dim, n_heads, dropout, causal)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6)
        self.moe = NoiseRoutedMoE(dim, hidden_dim, num_experts, top_k)

    def forward(self, x: Tensor, emb: Tensor, routing: Routing) -> Tensor:
        """x: [B, S, D], emb: [B, 1, D] -> [B, S, D]."""
        x = x + self.attn(self.norm1(x) + emb)
        return x + self.moe(self.norm2(x), routing)

    def forward_cached(self, x: Tensor, qkv_bias: Tensor, experts: FusedExperts) -> Tensor:
        """The same block at a cached level: W_qkv (n + phi) = W_qkv n + (W_qkv phi), the second term a bias."""
        x = x + self.attn(self.norm1(x), qkv_bias)
        return x + swiglu(self.norm2(x), *experts)


class MoDETransformer(nn.Module):
    """EDM's F network of MoDE. `embed_condition` once per chunk, then `forward` (routing per sample) or
    `forward_cached` (a `fuse_level` cache of one sampling level) per denoising step."""

    def __init__(
        self,
        action_dim: int,
        obs_dim: int,
        n_obs_steps: int,
        horizon: int,
        n_tasks: int = 1,
        embed_dim: int = 128,
        n_layers: int = 6,
        n_heads: int = 4,
        expert_hidden_dim: int = 256,
        num_experts: int = 4,
        top_k: int = 2,
        attn_dropout: float = 0.0,
        causal: bool = True,
    ) -> None:
        super().__init__()
        self.horizon = horizon
        self.noise_mlp = nn.Sequential(
            SinusoidalPosEmb(embed_dim),
            nn.Linear(embed_dim, 4 * embed_dim),
            nn.SiLU(),
            nn.Linear(4 * embed_dim, embed_dim),
        )
        self.task_emb = nn.Embedding(n_tasks, embed_dim)
        self.obs_proj = nn.Linear(obs_dim, embed_dim)
        self.action_proj = nn.Linear(action_dim, embed_dim)
        self.pos_emb = nn.Parameter(torch.randn(1, 2 + n_obs_steps + horizon, embed_dim) * 0.02)
        self.blocks = nn.ModuleList(
            MoDEBlock(embed_dim, n_heads, expert_hidden_dim, num_experts, top_k, attn_dropout, causal)
            for _ in range(n_layers)
        )
        self.norm_out = nn.RMSNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, action_dim)

    def embed_condition(self, obs_features: Tensor, task: Tensor) -> Tensor:
        """obs_features: [B, To, Do], task: int64 [B] -> conditioning tokens [B, 1 + To, D] (task, then obs)."""
        return torch.cat([self.task_emb(task)[:, None], self.obs_proj(obs_features)], dim=1)

    def noise_embedding(self, c_noise: Tensor) -> Tensor:
        """c_noise: [B] (= ln(sigma) / 4) -> phi: [B, D]."""
        return self.noise_mlp(c_noise)

    def forward(self, x_in: Tensor, c_noise: Tensor, cond: Tensor) -> tuple[Tensor, list[Routing]]:
        """x_in: [B, H, Da] (c_in * x), c_noise: [B], cond: [B, 1 + To, D] -> (F: [B, H, Da], every layer's
        Routing, for the load-balancing loss)."""
        emb = self.noise_embedding(c_noise)
        routings = [block.moe.route(emb) for block in self.blocks]
        x = self._tokens(x_in, cond, emb)
        for block, routing in zip(self.blocks, routings, strict=True):
            x = block(x, emb[:, None], routing)
        return self._head(x), routings

    @torch.no_grad()
    def fuse_level(self, c_noise: Tensor) -> CachedLevel:
        """c_noise: [1] -> the noise embedding, every layer's qkv bias and fused experts at that level."""
        emb = self.noise_embedding(c_noise)
        qkv_bias, fused = [], []
        for block in self.blocks:
            qkv_bias.append(F.linear(emb[0], block.attn.qkv.weight))
            r = block.moe.route(emb)
            fused.append(block.moe.fuse(r.weights[0], r.experts[0]))
        return CachedLevel(emb, qkv_bias, fused)

    def forward_cached(self, x_in: Tensor, cond: Tensor, level: CachedLevel) -> Tensor:
        """x_in: [B, H, Da], cond: [B, 1 + To, D], level from `fuse_level` -> F: [B, H, Da]."""
        x = self._tokens(x_in, cond, level.emb)
        for block, qkv_bias, experts in zip(self.blocks, level.qkv_bias, level.experts, strict=True):
            x = block.forward_cached(x, qkv_bias, experts)
        return self._head(x)

    def _tokens(self, x_in: Tensor, cond: Tensor, emb: Tensor) -> Tensor:
        """-> [B, 2 + To + H, D]: the paper's extra noise input token, the conditioning and the action tokens."""
        noise_token = emb[:, None].expand(x_in.shape[0], 1, -1)
        return torch.cat([noise_token, cond, self.action_proj(x_in)], dim=1) + self.pos_emb

    def _head(self, x: Tensor) -> Tensor:
        return self.head(self.norm_out(x[:, -self.horizon :]))
