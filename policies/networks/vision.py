"""Image encoders in plain torch (torchvision's wheels do not match the CPU torch build here).

Diffusion Policy's image setting (Chi et al., RSS 2023, Sec. 3.2 / robomimic's ``VisualCore``): per camera a
ResNet-18 trained from scratch with every BatchNorm replaced by GroupNorm, its global pooling and fc replaced by a
spatial softmax over 32 learned keypoints, and random-crop augmentation (84x84 of 96x96) in training, centre crop
at evaluation. Shapes: ``{key: [B, To, C, H, W]}`` float in [0, 1] -> ``[B, To, out_dim]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    # Diffusion Policy's replace_bn_with_gn: GroupNorm(channels // 16). BatchNorm's running statistics interact
    # badly with the EMA weights used at evaluation (Chi et al. 2023, Sec. 3.2); GroupNorm has none.
    return nn.GroupNorm(num_groups=channels // 16, num_channels=channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al. 2016, Fig. 2); 1x1 projection on a shape change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = group_norm(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), group_norm(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + identity)


class ResNet18GN(nn.Module):
    """ResNet-18 trunk (BasicBlock, layers [2, 2, 2, 2]) with GroupNorm; no pooling or fc.

    ``[N, C, H, W] -> [N, 512, h, w]`` with an overall stride of 32 (84x84 -> 3x3).
    """

    out_channels = 512

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
            group_norm(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        widths, strides = (64, 128, 256, 512), (1, 2, 2, 2)
        layers, channels = [], 64
        for width, stride in zip(widths, strides, strict=True):
            layers.append(nn.Sequential(BasicBlock(channels, width, stride), BasicBlock(width, width, 1)))
            channels = width
        self.layers = nn.Sequential(*layers)
        # torchvision's ResNet initialisation (He et al. 2015 fan-out normal for convs, identity norms).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x))


class SpatialSoftmax(nn.Module):
    """Learned keypoints (Levine et al. 2016, Sec. 4.1; robomimic's ``SpatialSoftmax``).

    A 1x1 convolution makes ``num_keypoints`` score maps; a softmax over the positions of each map gives an
    attention distribution whose expected image coordinates, in [-1, 1] (x along width, y along height), are the
    keypoint. ``[N, C, h, w] -> [N, 2 * num_keypoints]`` ordered (x0, y0, x1, y1, ...).
    """

    def __init__(self, in_channels: int, num_keypoints: int) -> None:
        super().__init__()
        self.num_keypoints = num_keypoints
        self.conv = nn.Conv2d(in_channels, num_keypoints, kernel_size=1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        h, w = feature.shape[-2:]
        attention = F.softmax(rearrange(self.conv(feature), "n k h w -> n k (h w)"), dim=-1)
        pos_y, pos_x = torch.meshgrid(
            torch.linspace(-1.0, 1.0, h, device=feature.device, dtype=attention.dtype),
            torch.linspace(-1.0, 1.0, w, device=feature.device, dtype=attention.dtype),
            indexing="ij",
        )
        grid = torch.stack([pos_x.reshape(-1), pos_y.reshape(-1)], dim=-1)  # [h*w, 2]
        return rearrange(attention @ grid, "n k xy -> n (k xy)")


def crop(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop each image at its own offset: ``images [N, C, H, W]``, ``top, left: [N]`` -> ``[N, C, height, width]``."""
    rows = top[:, None] + torch.arange(height, device=images.device)  # [N, height]
    cols = left[:, None] + torch.arange(width, device=images.device)  # [N, width]
    n = torch.arange(images.shape[0], device=images.device)[:, None, None]
    # Advanced indices around a slice put the indexed dims first: [N, height, width, C].
    return rearrange(images[n, :, rows[:, :, None], cols[:, None, :]], "n h w c -> n c h w")


class ImageEncoder(nn.Module):
    """One camera: crop -> ResNet-18-GN -> spatial softmax. ``[N, C, H, W]`` in [0, 1] -> ``[N, out_dim]``.

    Crop (Diffusion Policy's ``CropRandomizer``): in ``train()`` an independent uniformly random ``crop_shape``
    window per image; in ``eval()`` the centre window, so evaluation is deterministic. ``crop_shape=None`` keeps
    the full image.
    """

    def __init__(
        self, image_shape: Sequence[int], crop_shape: Sequence[int] | None = None, num_keypoints: int = 32
    ) -> None:
        super().__init__()
        c, h, w = image_shape
        if crop_shape is not None and (crop_shape[0] > h or crop_shape[1] > w):
            raise ValueError(f"crop_shape {list(crop_shape)} is larger than the image [H, W] = {[h, w]}")
        self.crop_shape = None if crop_shape is None else [int(crop_shape[0]), int(crop_shape[1])]
        self.backbone = ResNet18GN(c)
        self.pool = SpatialSoftmax(ResNet18GN.out_channels, num_keypoints)
        self.out_dim = 2 * num_keypoints

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.crop_shape is not None:
            n, _, h, w = images.shape
            ch, cw = self.crop_shape
            if self.training:
                top = torch.randint(0, h - ch + 1, (n,), device=images.device)
                left = torch.randint(0, w - cw + 1, (n,), device=images.device)
                images = crop(images, top, left, ch, cw)
            else:
                top, left = (h - ch) // 2, (w - cw) // 2
                images = images[..., top : top + ch, left : left + cw]
        # [0, 1] -> [-1, 1], Diffusion Policy's image range normalizer. No ImageNet statistics: the trunk is
        # trained from scratch, and zero-centred inputs are all a GroupNorm network needs.
        return self.pool(self.backbone(images * 2.0 - 1.0))


class MultiImageEncoder(nn.Module):
    """Every camera: ``{key: [B, To, C, H, W]}`` in [0, 1] -> ``[B, To, out_dim]``, per-camera features
    concatenated in key order. ``share=True`` runs one encoder on every camera (they must have the same shape)."""

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        crop_shape: Sequence[int] | None = None,
        num_keypoints: int = 32,
        share: bool = False,
    ) -> None:
        super().__init__()
        if not shapes:
            raise ValueError("MultiImageEncoder needs at least one image key")
        self.shapes = {k: [int(d) for d in s] for k, s in shapes.items()}
        for key, shape in self.shapes.items():
            if len(shape) != 3:
                raise ValueError(f"image '{key}' must have shape [C, H, W], got {shape}")
        self.keys = list(self.shapes)
        self.share = share
        if share:
            distinct = {tuple(s) for s in self.shapes.values()}
            if len(distinct) > 1:
                raise ValueError(f"share_vision_encoder needs cameras of one shape, got {self.shapes}")
            self.encoder = ImageEncoder(self.shapes[self.keys[0]], crop_shape, num_keypoints)
        else:
            self.encoders = nn.ModuleDict(
                {k: ImageEncoder(s, crop_shape, num_keypoints) for k, s in self.shapes.items()}
            )
        self.out_dim = len(self.keys) * 2 * num_keypoints

    def forward(self, images: Mapping[str, torch.Tensor]) -> torch.Tensor:
        b, t = None, None
        for key in self.keys:
            x = images.get(key)
            if x is None:
                raise ValueError(f"image '{key}' is missing; expected keys {self.keys}")
            if x.ndim != 5 or list(x.shape[2:]) != self.shapes[key] or (b is not None and x.shape[:2] != (b, t)):
                want = ", ".join(map(str, self.shapes[key]))
                raise ValueError(
                    f"image '{key}' has shape {list(x.shape)}, expected [B, To, {want}]"
                    + (f" with B={b}, To={t}" if b is not None else "")
                )
            b, t = x.shape[:2]
        if self.share:
            # One pass over every camera's images: [K * B * To, C, H, W].
            stacked = torch.stack([images[k] for k in self.keys])
            feats = self.encoder(rearrange(stacked, "k b t c h w -> (k b t) c h w"))
            return rearrange(feats, "(k b t) d -> b t (k d)", k=len(self.keys), b=b)
        feats = [self.encoders[k](rearrange(images[k], "b t c h w -> (b t) c h w")) for k in self.keys]
        return rearrange(torch.cat(feats, dim=-1), "(b t) d -> b t d", b=b)
