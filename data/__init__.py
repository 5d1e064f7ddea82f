"""Demonstration data: replay buffers, windowed sampling, normalization, datasets. Imports nothing of ours."""
