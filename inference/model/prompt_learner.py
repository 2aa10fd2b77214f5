"""AnomalyGPT's prompt learner: an anomaly map -> 18 soft prompt tokens of the LLM's width.

A small CNN (3x3 conv + ReLU + 2x max-pool, five times: 224 -> 7, then a 5x5 conv: 7 -> 3) turns the
map into a 3x3 grid of LLM-width vectors, so each of the 9 image prompt tokens speaks for one cell of
the grid the answers name ("top left" ... "bottom right"). 9 learned base tokens go in front of them,
as in the authors' code.

Example:
    >>> learner = PromptLearner(PromptLearnerConfig(d_llm=576))
    >>> learner(torch.rand(2, 1, 224, 224)).shape
    torch.Size([2, 18, 576])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PromptLearnerConfig:
    d_llm: int                                              # the LLM's hidden size
    map_size: int = 224                                     # side of the square anomaly map it reads
    widths: tuple[int, ...] = (4, 16, 64, 256, 1024)        # channels after each conv (AnomalyGPT's)
    n_base: int = 9                                         # learned base prompt tokens


class PromptLearner(nn.Module):
    """(B, 1, 224, 224) anomaly map -> (B, n_base + 9, d_llm) prompt tokens."""

    def __init__(self, config: PromptLearnerConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        channels = 1
        for width in config.widths:  # each pool halves the side: 224 -> 112 -> 56 -> 28 -> 14 -> 7
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        layers.append(nn.Conv2d(channels, config.d_llm, kernel_size=5))  # 7 -> 3: the 3x3 grid
        self.net = nn.Sequential(*layers)
        self.base_prompts = nn.Parameter(torch.randn(config.n_base, config.d_llm) * 0.02)

    def forward(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        B = anomaly_map.shape[0]
        grid = self.net(anomaly_map)                          # (B, d_llm, 3, 3)
        grid_tokens = grid.flatten(2).transpose(1, 2)         # (B, 9, d_llm), row-major: top left first
        base = self.base_prompts.expand(B, -1, -1)            # (B, n_base, d_llm)
        return torch.cat([base, grid_tokens], dim=1)          # (B, n_base + 9, d_llm)
