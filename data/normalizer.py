"""Per-dimension min-max normalizer that lives inside a policy as an ``nn.Module`` with buffers.

``normalize(x) = x * scale + offset`` maps each dimension's [min, max] to [-1, 1] (Diffusion Policy's
``LinearNormalizer`` in "limits" mode), or to [-g, g] for a dimension given a gain g at ``fit`` (RTI-DP's scaling of
a discrete dimension such as a gripper, Duan et al. 2025). Its statistics are buffers, so they are saved in and
restored from the policy's checkpoint with the weights and can never drift from the model that was trained with them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

# Dimensions whose range is below this are constant in the data (e.g. an unused joint): shift, don't scale.
_RANGE_EPS = 1e-4


class LinearNormalizer(nn.Module):
    """Keys and their feature sizes are fixed at construction (``{"action": 2, "state": 20}``)."""

    def __init__(self, dims: Mapping[str, int]) -> None:
        super().__init__()
        self.dims = dict(dims)
        for key, d in self.dims.items():
            self.register_buffer(f"{key}_scale", torch.ones(d))
            self.register_buffer(f"{key}_offset", torch.zeros(d))
            self.register_buffer(f"{key}_min", torch.zeros(d))
            self.register_buffer(f"{key}_max", torch.zeros(d))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def fit(
        self,
        data: Mapping[str, torch.Tensor],
        identity_keys: Iterable[str] = (),
        gains: Mapping[str, Sequence[float]] | None = None,
    ) -> LinearNormalizer:
        """Fit every key from ``data[key]: [..., D]``; ``identity_keys`` keep scale 1 and offset 0.
        ``gains {key: [D] factors > 0}`` multiply the normalized values of that key (dimension d then spans
        [-g_d, g_d]); they live in the scale and offset buffers, so ``unnormalize`` divides them back."""
        identity_keys = set(identity_keys)
        gains = dict(gains or {})
        missing = set(self.dims) - set(data)
        if missing:
            raise ValueError(f"normalizer.fit: no data for keys {sorted(missing)}")
        for key, gain in gains.items():
            if key not in self.dims or key in identity_keys or len(gain) != self.dims[key] or not min(gain) > 0:
                raise ValueError(
                    f"normalizer.fit: gains[{key!r}] must have {self.dims.get(key)} factors > 0 for a normalized key "
                    f"of {sorted(self.dims)}, got {list(gain)}"
                )
        for key, d in self.dims.items():
            x = torch.as_tensor(data[key], dtype=torch.float32).reshape(-1, d)
            if not torch.isfinite(x).all():
                raise ValueError(f"normalizer.fit: data for '{key}' contains NaN or inf")
            lo, hi = x.min(0).values, x.max(0).values
            getattr(self, f"{key}_min").copy_(lo)
            getattr(self, f"{key}_max").copy_(hi)
            if key in identity_keys:
                continue
            span = hi - lo
            const = span < _RANGE_EPS
            scale = torch.where(const, torch.ones_like(span), 2.0 / span.clamp_min(_RANGE_EPS))
            offset = torch.where(const, -lo, -1.0 - lo * scale)
            if key in gains:
                gain = torch.as_tensor(gains[key], dtype=torch.float32)
                scale, offset = scale * gain, offset * gain
            getattr(self, f"{key}_scale").copy_(scale)
            getattr(self, f"{key}_offset").copy_(offset)
        self.fitted.fill_(True)
        return self

    def _params(self, key: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not bool(self.fitted):
            raise RuntimeError("normalizer used before fit() or loading a checkpoint")
        if key not in self.dims:
            raise KeyError(f"normalizer has no key '{key}'; keys: {sorted(self.dims)}")
        if x.shape[-1] != self.dims[key]:
            raise ValueError(f"'{key}' has last dimension {x.shape[-1]}, expected {self.dims[key]}")
        return getattr(self, f"{key}_scale"), getattr(self, f"{key}_offset")

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        scale, offset = self._params(key, x)
        return x * scale + offset

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        scale, offset = self._params(key, x)
        return (x - offset) / scale
