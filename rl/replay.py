"""A replay buffer of fixed-shape tensors (off-policy methods: residual SAC, DSRL, DSRL-NA).

``ReplayBuffer(capacity, {"x": (F,), "w": (D,), ...})``; ``add(x=[n, F], ...)`` writes a ring; ``sample(n)`` draws
uniformly from what is stored. Its storage is plain tensors, saved with the run for resume (no pickle).
"""

from __future__ import annotations

import torch


class ReplayBuffer:
    def __init__(self, capacity: int, shapes: dict[str, tuple[int, ...]], device: str | torch.device = "cpu") -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.storage = {k: torch.zeros((capacity, *shape), device=device) for k, shape in shapes.items()}
        self.ptr = 0  # the next row to write
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, **rows: torch.Tensor) -> None:
        """Append ``n`` rows: every stored field, each ``[n, *shape]``."""
        if set(rows) != set(self.storage):
            raise ValueError(f"add() needs exactly the fields {sorted(self.storage)}, got {sorted(rows)}")
        n = {len(v) for v in rows.values()}
        if len(n) != 1:
            raise ValueError(f"every field must have the same number of rows, got {n}")
        n_rows = n.pop()
        idx = (self.ptr + torch.arange(n_rows)) % self.capacity
        for key, value in rows.items():
            self.storage[key][idx] = value.detach().to(self.storage[key].dtype)
        self.ptr = int((self.ptr + n_rows) % self.capacity)
        self.size = min(self.size + n_rows, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = torch.randint(0, self.size, (batch_size,), generator=generator)
        return {key: value[idx] for key, value in self.storage.items()}

    def state(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """The filled rows as ``{prefix.field: tensor}`` and the ring position, for resume."""
        tensors = {f"{prefix}.{k}": v[: self.size].clone() for k, v in self.storage.items()}
        return tensors, {"ptr": self.ptr, "size": self.size}

    def load_state(self, prefix: str, tensors: dict[str, torch.Tensor], meta: dict[str, int]) -> None:
        self.ptr, self.size = int(meta["ptr"]), int(meta["size"])
        for key, value in self.storage.items():
            value[: self.size] = tensors[f"{prefix}.{key}"]
