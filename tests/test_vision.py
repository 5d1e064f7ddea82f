"""Image observations: ResNet-18-GN + spatial-softmax encoders, crop augmentation, image policies end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import policies  # noqa: F401  (registers every policy)
from data.pusht import shape_meta
from policies.checkpoint import load_policy, save_checkpoint
from policies.networks.vision import ImageEncoder, MultiImageEncoder, ResNet18GN, SpatialSoftmax, crop
from policies.registry import config_class, make_policy, plugin_names, policy_names

# The policy family trained from demonstrations; RL adapters (entry-point plugins, registered once `rl` is
# imported by another test module) wrap a trained base and have their own tests.
FAMILY = sorted(set(policy_names()) - set(plugin_names()))

IMAGE_META = shape_meta("image")  # {"image": [3, 96, 96], "agent_pos": [2]}, action [2]
B, TO = 2, 2


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# -- encoders ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("share", [False, True])
def test_output_shapes_one_and_two_cameras(share):
    torch.manual_seed(0)
    one = MultiImageEncoder({"image": [3, 96, 96]}, crop_shape=[84, 84], num_keypoints=8, share=share)
    assert one.out_dim == 16
    assert one({"image": images(B, TO, 3, 96, 96)}).shape == (B, TO, 16)

    two = MultiImageEncoder({"left": [3, 64, 64], "right": [3, 64, 64]}, crop_shape=None, num_keypoints=8, share=share)
    assert two.out_dim == 32
    x = {"left": images(B, TO, 3, 64, 64, seed=1), "right": images(B, TO, 3, 64, 64, seed=2)}
    out = two(x)
    assert out.shape == (B, TO, 32)
    # Features are concatenated in key order, each camera's from its own (or the shared) encoder.
    left = two.encoder if share else two.encoders["left"]
    right = two.encoder if share else two.encoders["right"]
    assert torch.allclose(out[..., :16], left(x["left"].flatten(0, 1)).unflatten(0, (B, TO)), atol=1e-5)
    assert torch.allclose(out[..., 16:], right(x["right"].flatten(0, 1)).unflatten(0, (B, TO)), atol=1e-5)
    n_trunks = sum(isinstance(m, ResNet18GN) for m in two.modules())
    assert n_trunks == (1 if share else 2)


def test_random_crop_in_train_centre_crop_in_eval():
    torch.manual_seed(0)
    enc = ImageEncoder([3, 96, 96], crop_shape=[84, 84], num_keypoints=8)
    x = images(4, 3, 96, 96)
    enc.eval()
    assert torch.equal(enc(x), enc(x))
    # Eval is the centre window: the same weights without cropping on the centre 84x84 give the same features.
    full = ImageEncoder([3, 84, 84], crop_shape=None, num_keypoints=8).eval()
    full.load_state_dict(enc.state_dict())
    assert torch.equal(enc(x), full(x[..., 6:90, 6:90]))
    enc.train()
    assert not torch.allclose(enc(x), enc(x))


def test_crop_takes_an_independent_window_per_image():
    x = images(3, 2, 10, 12)
    top, left = torch.tensor([0, 3, 5]), torch.tensor([4, 0, 6])
    out = crop(x, top, left, 5, 6)
    assert out.shape == (3, 2, 5, 6)
    for i in range(3):
        assert torch.equal(out[i], x[i, :, top[i] : top[i] + 5, left[i] : left[i] + 6])
    # Random training crops cover different offsets across the images of one batch.
    enc = ImageEncoder([3, 12, 12], crop_shape=[4, 4], num_keypoints=1).train()
    torch.manual_seed(0)
    seen = []
    enc.backbone.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    same = images(1, 3, 12, 12).expand(16, -1, -1, -1)
    enc(same)
    assert len({tuple(c.flatten().tolist()) for c in seen[0]}) > 1


def test_spatial_softmax_one_hot_gives_the_pixel_coordinate():
    ss = SpatialSoftmax(in_channels=2, num_keypoints=2)
    with torch.no_grad():  # keypoint k reads channel k
        ss.conv.weight.copy_(torch.eye(2)[:, :, None, None])
        ss.conv.bias.zero_()
    feature = torch.zeros(1, 2, 5, 9)  # h=5, w=9
    feature[0, 0, 1, 6] = 1e4  # keypoint 0 at row 1, column 6
    feature[0, 1, 4, 0] = 1e4  # keypoint 1 at row 4, column 0
    out = ss(feature)
    # x = -1 + 2 * col / (w - 1), y = -1 + 2 * row / (h - 1), ordered (x0, y0, x1, y1).
    assert torch.allclose(out, torch.tensor([[0.5, -0.5, -1.0, 1.0]]), atol=1e-6)
    # A constant map attends uniformly: the keypoint is the image centre.
    assert torch.allclose(ss(torch.zeros(3, 2, 4, 4)), torch.zeros(3, 4), atol=1e-6)


def test_group_norm_everywhere_and_no_batch_norm():
    enc = MultiImageEncoder({"image": [3, 96, 96]})
    norms = [m for m in enc.modules() if isinstance(m, nn.GroupNorm)]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in enc.modules())
    # Stem + 8 blocks x 2 + 3 downsample projections, each with channels // 16 groups.
    assert len(norms) == 1 + 16 + 3
    assert all(m.num_groups == m.num_channels // 16 for m in norms)


def test_trunk_has_resnet18_parameter_count():
    trunk = ResNet18GN(3)
    # torchvision resnet18: 11,689,512 parameters, minus fc (512 * 1000 + 1000) = 11,176,512. GroupNorm has the
    # same affine parameters as BatchNorm.
    assert sum(p.numel() for p in trunk.parameters()) == 11_176_512
    assert trunk(torch.zeros(1, 3, 84, 84)).shape == (1, 512, 3, 3)


def test_bad_image_shapes_are_clear_errors():
    enc = MultiImageEncoder({"image": [3, 96, 96]}, crop_shape=[84, 84], num_keypoints=4)
    with pytest.raises(ValueError, match=r"image 'image' has shape \[2, 2, 3, 64, 64\], expected \[B, To, 3, 96, 96\]"):
        enc({"image": torch.zeros(2, 2, 3, 64, 64)})
    with pytest.raises(ValueError, match=r"image 'image' has shape \[4, 3, 96, 96\]"):
        enc({"image": torch.zeros(4, 3, 96, 96)})
    with pytest.raises(ValueError, match=r"image 'image' is missing"):
        enc({"cam": torch.zeros(2, 2, 3, 96, 96)})
    with pytest.raises(ValueError, match=r"crop_shape \[100, 84\] is larger than the image \[H, W\] = \[96, 96\]"):
        MultiImageEncoder({"image": [3, 96, 96]}, crop_shape=[100, 84])
    with pytest.raises(ValueError, match=r"share_vision_encoder needs cameras of one shape"):
        MultiImageEncoder({"a": [3, 96, 96], "b": [3, 64, 64]}, share=True)
    with pytest.raises(ValueError, match=r"image 'a' must have shape \[C, H, W\], got \[96, 96\]"):
        MultiImageEncoder({"a": [96, 96]})


# -- image policies (every registered policy that takes images) --------------------------------------------------
def image_policy(name: str):
    cls = config_class(name)
    torch.manual_seed(0)
    policy = make_policy(cls(vision_keypoints=8), IMAGE_META)
    policy.fit_normalizer({"agent_pos": torch.rand(64, 2) * 400 + 50, "action": torch.rand(64, 2) * 300 + 100})
    return policy


def image_batch(policy, b: int = B) -> dict:
    g = torch.Generator().manual_seed(1)
    c = policy.config

    def obs() -> dict:
        return {
            "image": torch.rand(b, c.n_obs_steps, 3, 96, 96, generator=g),
            "agent_pos": torch.rand(b, c.n_obs_steps, 2, generator=g) * 400 + 50,
        }

    batch = {"obs": obs(), "action": torch.rand(b, c.horizon, 2, generator=g) * 300 + 100}
    if policy.config.needs_transitions:  # offline-RL objectives also read the next chunk's transition
        batch |= {
            "next_obs": obs(),
            "reward": torch.rand(b, c.n_action_steps),
            "terminal": torch.zeros(b, c.n_action_steps),
        }
    return batch


@pytest.mark.parametrize("name", FAMILY)
def test_image_policy_loss_backward_reaches_the_encoder(name):
    policy = image_policy(name).train()
    assert policy.obs_feature_dim == 2 + 16
    loss, _ = policy.compute_loss(image_batch(policy))
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in policy.image_encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("name", FAMILY)
def test_image_policy_predicts_chunks_and_reloads_identically(name, tmp_path):
    policy = image_policy(name).eval()
    obs = image_batch(policy)["obs"]
    noise = torch.randn(B, policy.config.horizon, 2, generator=torch.Generator().manual_seed(2))
    chunk = policy.predict_action_chunk(obs, noise=noise)
    assert chunk.shape == (B, policy.config.horizon, 2) and torch.isfinite(chunk).all()
    assert torch.equal(policy.predict_action_chunk(obs, noise=noise), chunk)  # eval crop is deterministic
    loaded = load_policy(save_checkpoint(policy, tmp_path / "ckpt"))
    assert loaded.shape_meta == IMAGE_META
    assert torch.equal(loaded.predict_action_chunk(obs, noise=noise), chunk)


@pytest.mark.slow
def test_cli_trains_and_evaluates_on_images(tmp_path, pusht_path):
    run_dir = tmp_path / "run"
    args = [
        "train",
        "task=pusht_image",
        "policy=diffusion_unet",
        "policy.down_dims=[16,32]",
        "policy.diffusion_step_embed_dim=16",
        "policy.horizon=8",
        "policy.n_action_steps=4",
        "policy.vision_keypoints=4",
        "train.steps=2",
        "train.batch_size=4",
        "train.log_every=1",
        "train.val_every=0",
        "train.warmup_steps=1",
        "task.eval_episodes=1",
        "task.max_steps=8",
        "task.n_envs=1",
        "logger=none",
        "video=false",
        f"task.dataset_path={pusht_path}",
        f"run_dir={run_dir}",
    ]
    proc = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    latest = run_dir / "checkpoints" / "latest"
    assert (latest / "model.safetensors").exists()
    policy = load_policy(latest)
    assert policy.shape_meta["obs"]["image"] == [3, 96, 96] and policy.image_encoder is not None
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["step"] == 2 and out["n_episodes"] == 1 and 0.0 <= out["score"] <= 1.0
