"""Retina family: foveated attention in every layer (design.md §3).

Every layer is token-level; token t reads the last ~W tokens at full resolution and pooled keys/values of
complete older blocks at coarser scales, each position once (modules/retina_attention.py). Windows are set
per layer, so "short range in the lower layers, long range on top" (Rae & Razavi 2020) is one option away.
"""
import torch
import torch.nn as nn

from ..modules import TransformerBlock
from ..modules.retina_attention import RetinaAttention


class Retina(nn.Module):
    def __init__(self, args, grid, plan):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerBlock(args, RetinaAttention(args, grid, window, blocks)) for window, blocks in plan.retina_layers
        )

    def forward(self, x: torch.Tensor, inner_states: list) -> torch.Tensor:
        # x: (B, T, C) token embeddings, T a multiple of the grid
        for layer in self.layers:
            x = layer(x)
            inner_states.append(x)
        return x

    def step(self, x: torch.Tensor, t: int, cache: dict) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer.step(x, t, cache, f"layer{i}")
        return x
