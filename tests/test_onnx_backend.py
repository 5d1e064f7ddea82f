"""backend=onnx (policies/onnx_backend.py): the UNet through ONNX Runtime gives the torch policy's chunks to float
rounding, training and per-action timesteps stay on torch, and the CLI / deployment loader take the option."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="backend 'onnx' is optional (pip install -e .[onnx])")

import policies  # noqa: E402, F401  (registers every policy)
from data.pusht import shape_meta  # noqa: E402
from policies.onnx_backend import OnnxUnet, check_backend, use_onnx  # noqa: E402
from policies.registry import config_class, make_policy  # noqa: E402

SHAPE_META = shape_meta("state")
TINY_UNET = {"down_dims": [16, 32], "diffusion_step_embed_dim": 16}
RANGE = 300.0  # the action range of the fitted normalizer below


def tiny(name: str, **overrides):
    torch.manual_seed(0)
    policy = make_policy(config_class(name)(**TINY_UNET, **overrides), SHAPE_META)
    policy.fit_normalizer({"state": torch.rand(64, 20) * 400 + 50, "action": torch.rand(64, 2) * RANGE + 100})
    return policy.eval()


def obs_window(b: int = 3) -> dict[str, torch.Tensor]:
    return {"state": torch.rand(b, 2, 20, generator=torch.Generator().manual_seed(1)) * 400 + 50}


@pytest.mark.parametrize("name", ["diffusion_unet", "flow_unet", "meanflow"])
def test_onnx_chunks_equal_torch_chunks(name: str) -> None:
    policy = tiny(name)
    obs, noise = obs_window(), torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(2))
    ref = policy.predict_action_chunk(obs, noise=noise)
    calls = []
    assert use_onnx(policy, threads=1) is policy and isinstance(policy.model.forward, OnnxUnet)
    session_run = policy.model.forward.session.run
    policy.model.forward.session.run = lambda *a, **k: calls.append(1) or session_run(*a, **k)
    out = policy.predict_action_chunk(obs, noise=noise)
    assert len(calls) == policy.config.num_inference_steps  # every denoiser pass went through the graph
    assert (out - ref).abs().max().item() / RANGE < 1e-5
    assert not torch.equal(out, policy.predict_action_chunk(obs))  # fresh noise still samples
    forward = policy.model.forward
    use_onnx(policy)  # idempotent: no second export
    assert policy.model.forward is forward
    one = policy.predict_action_chunk(obs_window(b=1), noise=noise[:1])  # dynamic batch size
    assert (one - ref[:1]).abs().max().item() / RANGE < 1e-5


def test_training_and_per_action_levels_stay_on_torch() -> None:
    policy = tiny("diffusion_unet")
    batch = {"obs": obs_window(b=4), "action": torch.rand(4, 16, 2) * RANGE + 100}
    torch.manual_seed(3)
    loss_torch, _ = policy.train().compute_loss(batch)
    use_onnx(policy.eval(), threads=1)
    torch.manual_seed(3)
    loss_onnx, _ = policy.train().compute_loss(batch)
    loss_onnx.backward()  # the graph would have cut autograd: training falls back to torch
    assert torch.equal(loss_torch, loss_onnx) and policy.model.final[-1].weight.grad.abs().sum() > 0

    streaming = tiny("streaming").eval()
    obs = obs_window(b=2)
    _, buffer = streaming.stream(obs, None)  # the episode start: a full sampling run
    torch.manual_seed(4)
    chunk_ref, next_ref = streaming.stream(obs, buffer)
    use_onnx(streaming, threads=1)
    torch.manual_seed(4)
    chunk, nxt = streaming.stream(obs, buffer)  # per-action levels [B, H]: torch's own forward, bit for bit
    assert torch.equal(chunk, chunk_ref) and torch.equal(nxt, next_ref)


def test_unsupported_policy_and_backend_names() -> None:
    transformer = make_policy(config_class("diffusion_transformer")(n_layer=1, n_emb=16, n_head=2), SHAPE_META)
    with pytest.raises(ValueError, match=r"exports a 1-D conditional UNet \(diffusion_unet, flow_unet"):
        use_onnx(transformer)
    with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'onnx'\), got 'tensorrt'"):
        check_backend("tensorrt")


def test_action_source_with_onnx_backend_acts_like_torch(tmp_path) -> None:
    from deploy.source import load_action_source
    from policies.checkpoint import save_checkpoint

    save_checkpoint(tiny("diffusion_unet"), tmp_path / "ckpt", extra_config={"task": {"name": "pusht_state"}})
    actions = {}
    for backend in ("torch", "onnx"):
        source = load_action_source(tmp_path / "ckpt", "chunk", backend=backend)
        source.reset()
        torch.manual_seed(5)
        actions[backend] = np.stack([source.act({"state": np.full(20, 200.0, np.float32)}) for _ in range(3)])
    assert np.abs(actions["onnx"] - actions["torch"]).max() / RANGE < 1e-5
    with pytest.raises(ValueError, match="backend must be one of"):
        load_action_source(tmp_path / "ckpt", backend="tensorrt")


def test_robodiff_eval_with_onnx_backend(tmp_path) -> None:
    from cli.main import UsageError, cmd_eval
    from policies.checkpoint import save_checkpoint

    save_checkpoint(tiny("diffusion_unet"), tmp_path / "ckpt", extra_config={"task": {"name": "pusht_state"}})
    common = [f"checkpoint={tmp_path / 'ckpt'}", "n_episodes=2", "n_envs=1", "max_steps=4", "video=false"]
    result = cmd_eval([*common, "backend=onnx", f"output_dir={tmp_path / 'eval'}"])
    assert result["n_episodes"] == 2 and result["mean_length"] == 4
    with pytest.raises(UsageError, match="backend must be one of"):
        cmd_eval([*common, "backend=tensorrt"])
