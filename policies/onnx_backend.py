"""Inference through ONNX Runtime: a policy's 1-D conditional UNet exported to an ONNX graph and run by ONNX
Runtime's CPU kernels, which at batch 1 are several times faster than PyTorch's eager convolutions on this kind of
CPU (BENCHMARKS.md, "Against the field"). The sampler, normalizer and observation encoder stay in torch; only the
denoiser network's forward changes, so a chunk differs from the torch one by float rounding only (tests: 1e-5).

    policy = use_onnx(load_policy(checkpoint))   # or: robodiff eval ... backend=onnx / robodiff deploy ... backend=onnx

Supported: every policy whose network is ``policies.networks.unet1d.ConditionalUnet1D`` (``diffusion_unet``,
``flow_unet``, ``meanflow``, ``ofql``, ``streaming``). Calls the graph does not cover fall back to torch: per-action
timesteps ``[B, H]`` (Streaming DP's buffer) and anything under autograd (training never runs through the graph).
Needs the ``onnx`` extra (``onnxruntime``, ``onnx``, ``onnxscript`` for ``torch.onnx.export``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from policies.networks.unet1d import ConditionalUnet1D

BACKENDS = ("torch", "onnx")


class _Graph(nn.Module):
    """The exported signature: float timesteps ``[B]`` (DDPM's integer steps are exact in float32)."""

    def __init__(self, unet: ConditionalUnet1D) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, global_cond)


class _Graph2(_Graph):
    """MeanFlow's two-time UNet: ``timestep2 [B]`` as well."""

    def forward(  # type: ignore[override]
        self, sample: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor, timestep2: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(sample, timestep, global_cond, timestep2=timestep2)


class OnnxUnet:
    """``ConditionalUnet1D.forward`` replacement backed by an ONNX Runtime session (dynamic batch size)."""

    def __init__(self, unet: ConditionalUnet1D, horizon: int, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ImportError(
                "backend 'onnx' needs onnxruntime, onnx and onnxscript: pip install -e '.[onnx]'"
            ) from err
        self.unet, self.torch_forward = unet, unet.forward
        self.two_times = unet.step_encoder2 is not None
        b, dev = 2, next(unet.parameters()).device
        args = [torch.zeros(b, horizon, unet.input_dim), torch.ones(b), torch.zeros(b, unet.global_cond_dim)]
        args += [torch.ones(b)] if self.two_times else []
        names = ["sample", "timestep", "global_cond"] + (["timestep2"] if self.two_times else [])
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic = tuple({0: batch} for _ in args)
        self.path = Path(tempfile.mkdtemp(prefix="robodiff_onnx_")) / "unet.onnx"
        graph = (_Graph2 if self.two_times else _Graph)(unet).cpu().eval()
        with torch.no_grad():
            torch.onnx.export(
                graph, tuple(args), str(self.path), input_names=names, output_names=["out"],
                dynamic_shapes=dynamic, dynamo=True, verbose=False,
            )  # fmt: skip
        unet.to(dev)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.names = names

    def _times(self, t: Any, b: int) -> np.ndarray | None:
        """Timesteps as float32 ``[B]``, or None where the graph does not apply (per-action levels)."""
        t = torch.as_tensor(t, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(b)
        elif t.ndim == 2 and t.shape[1] == 1:
            t = t[:, 0]
        if t.shape != (b,):
            return None
        return t.detach().cpu().numpy()

    def __call__(
        self, sample: torch.Tensor, timestep: Any, global_cond: torch.Tensor, timestep2: Any = None
    ) -> torch.Tensor:
        b = sample.shape[0]
        times = [self._times(timestep, b)] + ([self._times(timestep2, b)] if self.two_times else [])
        if torch.is_grad_enabled() or any(t is None for t in times) or (timestep2 is None) == self.two_times:
            return self.torch_forward(sample, timestep, global_cond, timestep2=timestep2)
        arrays = [sample.detach().cpu().numpy(), times[0], global_cond.detach().cpu().numpy(), *times[1:]]
        feeds = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in zip(self.names, arrays, strict=True)}
        (out,) = self.session.run(None, feeds)
        return torch.from_numpy(out).to(sample.device)


def use_onnx(policy: Any, threads: int | None = None) -> Any:
    """Run ``policy``'s UNet through ONNX Runtime from now on (in place; returns the policy). The weights, the
    checkpoint format and training are unchanged; ``threads`` None: torch's thread count."""
    unet = getattr(policy, "model", None)
    if not isinstance(unet, ConditionalUnet1D):
        raise ValueError(
            f"backend 'onnx' exports a 1-D conditional UNet (diffusion_unet, flow_unet, meanflow, ofql, streaming); "
            f"{type(policy).__name__} has {type(unet).__name__}"
        )
    if not isinstance(unet.forward, OnnxUnet):
        unet.forward = OnnxUnet(unet, policy.config.horizon, threads)  # instance attribute: nn.Module calls it
    return policy


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend
