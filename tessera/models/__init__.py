"""Built-in models for the example jobs: an MLP and a small CNN."""

from __future__ import annotations

import math

from torch import nn

from tessera.config.schema import ModelConfig


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if cfg.name == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)
    if len(input_shape) != 3:
        raise ValueError(f"model 'cnn' needs image inputs (channels, height, width); "
                         f"the data has shape {input_shape}")
    c1, c2 = cfg.channels
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * (height // 4) * (width // 4), 128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )
