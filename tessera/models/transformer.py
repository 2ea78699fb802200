"""A small GPT-style character language model, built to be cut into pipeline stages.

The architecture is GPT-2's (Radford et al., "Language Models are Unsupervised
Multitask Learners", 2019) at toy size, as in nanoGPT: learned token and
position embeddings, then ``layers`` pre-LayerNorm blocks of causal
self-attention and a 4x-wide GELU MLP, each wrapped in a residual connection,
then a final LayerNorm and a linear map to one logit per vocabulary entry.

Why an ``nn.Sequential`` of one embedding, ``layers`` blocks and one head: a
pipeline (``tessera.parallel.pipeline``) cuts a model only at child
boundaries, and ``torch.distributed.pipelining`` passes exactly one tensor
between stages. So every child takes one tensor and returns one: int64 codes
``[B, T]`` into the embedding, float activations ``[B, T, dim]`` between
blocks, logits ``[B, T, vocab]`` out of the head. Two consequences:

* The output layer does not share its weight with the token embedding (GPT-2
  ties them): the two would sit in different stages, and keeping a tied weight
  in step across processes is a seam this model does not need.
* Attention is causal inside each block (``scaled_dot_product_attention`` with
  ``is_causal=True``), so position ``t``'s logits depend only on tokens ``<= t``,
  however the model is cut.

Initialisation follows GPT-2: weights ``N(0, 0.02)``, biases zero, and the two
projections that write into the residual stream scaled by ``1/sqrt(2 * layers)``
so the stream's variance does not grow with depth. All randomness comes from
torch's global generator, so ``torch.manual_seed(s)`` before
:func:`char_transformer` gives the same weights on every process.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_INIT_STD = 0.02  # GPT-2's initialiser range (its config's initializer_range)


class TokenAndPosition(nn.Module):
    """Character codes ``[B, T]`` (int64, ``T <= context``) -> embeddings ``[B, T, dim]``."""

    def __init__(self, vocab_size: int, context: int, dim: int, dropout: float = 0.0):
        super().__init__()
        self.context = context
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(context, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() != 2 or codes.dtype != torch.int64:
            raise ValueError(f"the model takes int64 character codes [batch, time], got "
                             f"{codes.dtype} {tuple(codes.shape)}")
        steps = codes.shape[1]
        if steps > self.context:
            raise ValueError(f"a sequence of {steps} characters is longer than the model's "
                             f"context of {self.context}; build it with context >= {steps} or "
                             f"feed shorter windows")
        positions = torch.arange(steps, device=codes.device)
        return self.dropout(self.token(codes) + self.position(positions))


class Block(nn.Module):
    """``x + attention(LN(x))``, then ``x + MLP(LN(x))``; ``[B, T, dim]`` in and out."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.ln_attention = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attention_out = nn.Linear(dim, dim)
        self.ln_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, dim = x.shape
        # [B, T, 3 * dim] -> three [B, heads, T, dim / heads]
        q, k, v = self.qkv(self.ln_attention(x)).view(batch, steps, 3, self.heads, -1) \
            .permute(2, 0, 3, 1, 4)
        attended = _causal_attention(q, k, v, self.dropout if self.training else 0.0)
        attended = attended.transpose(1, 2).reshape(batch, steps, dim)
        x = x + self.residual_dropout(self.attention_out(attended))
        return x + self.residual_dropout(self.mlp(self.ln_mlp(x)))


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      dropout_p: float) -> torch.Tensor:
    """Causal ``scaled_dot_product_attention``; on the CPU, half-width inputs attend in
    fp32 and the result is cast back: torch's CPU flash-attention kernel runs its bf16
    backward ~7x slower than its fp32 one (torch 2.13, avx512_bf16), which made a small
    model train slower under bf16 than under fp32 (benchmarks/precision.py). The
    projections around it stay bf16; fp32 inputs take the unchanged path."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                 is_causal=True, dropout_p=dropout_p)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


class Head(nn.Module):
    """Final LayerNorm and output layer: ``[B, T, dim]`` -> logits ``[B, T, vocab]``."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


def char_transformer(vocab_size: int, *, context: int = 64, dim: int = 128, heads: int = 4,
                     layers: int = 4, dropout: float = 0.0) -> nn.Sequential:
    """``nn.Sequential(TokenAndPosition, Block x layers, Head)``: codes ``[B, T]`` -> logits.

    Children are named ``embed``, ``block0`` .. ``block{layers-1}`` and ``head``, so
    ``pipeline.split_points`` can name them (e.g. ``["block2"]`` for two stages).
    """
    for name, value in (("vocab_size", vocab_size), ("context", context), ("dim", dim),
                        ("heads", heads), ("layers", layers)):
        if value < 1:
            raise ValueError(f"char_transformer: {name} must be a positive integer, got {value}")
    if dim % heads:
        raise ValueError(f"char_transformer: dim {dim} is not divisible by heads {heads}; "
                         f"each head gets dim / heads features (e.g. dim 128 with 4 heads)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"char_transformer: dropout must be in [0, 1), got {dropout}")

    children: dict[str, nn.Module] = {"embed": TokenAndPosition(vocab_size, context, dim, dropout)}
    for i in range(layers):
        children[f"block{i}"] = Block(dim, heads, dropout)
    children["head"] = Head(dim, vocab_size)
    model = nn.Sequential()
    for name, child in children.items():
        model.add_module(name, child)

    residual_std = _INIT_STD / math.sqrt(2 * layers)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=_INIT_STD)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    for block in model[1:-1]:
        nn.init.normal_(block.attention_out.weight, std=residual_std)
        nn.init.normal_(block.mlp[2].weight, std=residual_std)
    return model


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all positions, in nats per character."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
