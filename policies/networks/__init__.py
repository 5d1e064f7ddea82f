"""Denoiser networks: plain tensors in and out, primitive constructor arguments (no configs)."""

from policies.networks.unet1d import ConditionalUnet1D

__all__ = ["ConditionalUnet1D"]
