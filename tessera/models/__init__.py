"""Built-in models for the example jobs: an MLP and a small CNN."""

from __future__ import annotations

import math

import torch
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
    return ConvNet(
        nn.Conv2d(channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * (height // 4) * (width // 4), 128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )


class ConvNet(nn.Sequential):
    """The CNN: an ``nn.Sequential`` (same children, parameter names and fp32 results)
    that, when it computes in half width on the CPU (bf16 parameters or autocast), takes
    the image batch in channels_last. oneDNN's bf16 convolutions and max-pooling are ~1.8x
    faster in that layout than in NCHW here (torch 2.13, avx512_bf16; NCHW bf16
    max-pooling is slower than fp32's), while bf16 on NCHW gained only ~1.3x over fp32
    (benchmarks/precision.py, ``precision_torch`` lines). fp32 keeps NCHW and its exact
    results."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.device.type == "cpu" and _half_compute(self[0].weight):
            x = channels_last(x)
        return super().forward(x)


def _half_compute(weight: torch.Tensor) -> bool:
    return weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu")


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) laid out channels_last. With one channel NCHW already is, but
    torch reads its strides as NCHW and picks the NCHW kernels: the same bytes are
    viewed with channels_last strides instead (no copy)."""
    n, c, h, w = x.shape
    if c != 1:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous().as_strided((n, 1, h, w), (h * w, 1, w, 1))
