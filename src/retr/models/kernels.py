"""Compute kernels that beat torch's defaults on a CPU: dropout, attention with dropout, autocast.

Every model reaches these through ``retr.models.layers``; keeping them apart keeps the layers
readable as equations, and lets the training loss ask which autocast dtype is in force.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force on ``device_type``, or None outside autocast."""
    try:
        on = bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: one query per device type
        on = bool(torch.is_autocast_cpu_enabled() if device_type == "cpu"
                  else torch.is_autocast_enabled())
    if not on:
        return None
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(device_type)
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype()
    return torch.get_autocast_gpu_dtype()


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout, as ``F.dropout``, drawing its mask from one uniform per value on the CPU.

    torch's CPU dropout samples its Bernoulli mask about three times slower than a uniform draw
    and a compare (u >= p keeps with probability exactly 1 - p); on a CPU that sampling was a
    tenth of a training step. Other devices keep torch's fused kernel.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    keep = torch.rand(x.shape, dtype=torch.float32) >= p  # exact p in any x dtype
    return (x * keep).mul_(1.0 / (1.0 - p))


class _DropoutAttention(torch.autograd.Function):
    """Dropout(Softmax(Q K^T / sqrt(d_h) | allowed)) V for training on the CPU.

    The same function as ``scaled_dot_product_attention(..., dropout_p=p)``, whose CPU path for
    dropout materialises the scores, an additive float mask, the probabilities and their dropped
    copy, and draws the dropout mask with a Bernoulli sampler about three times as slow as one
    uniform draw and a compare. Here backward keeps only the probabilities and a bool keep mask
    [B, h, Nq, N] and rebuilds the dropped copy: less memory per layer and a faster step.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                allowed: torch.Tensor, p: float) -> torch.Tensor:
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = torch.matmul(q * scale, k.transpose(-2, -1))  # [B, h, Nq, N]
        scores.masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # [B, h, Nq, N]
        del scores
        keep = torch.rand_like(probs) >= p  # [B, h, Nq, N] bool, P(keep) = 1 - p
        y = torch.matmul((probs * keep).mul_(1.0 / (1.0 - p)), v)  # [B, h, Nq, d/h]
        ctx.save_for_backward(q, k, v, probs, keep)
        ctx.p, ctx.scale = p, scale
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, probs, keep = ctx.saved_tensors
        c = 1.0 / (1.0 - ctx.p)
        dv = torch.matmul((probs * keep).mul_(c).transpose(-2, -1), dy)  # [B, h, N, d/h]
        dp = torch.matmul(dy, v.transpose(-2, -1)).mul_(keep).mul_(c)  # [B, h, Nq, N] dL/dprobs
        ds = dp.sub_((dp * probs).sum(dim=-1, keepdim=True)).mul_(probs)  # softmax backward
        dq = torch.matmul(ds, k).mul_(ctx.scale)  # [B, h, Nq, d/h]
        dk = torch.matmul(ds.transpose(-2, -1), q).mul_(ctx.scale)  # [B, h, N, d/h]
        return dq, dk, dv, None, None


def dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                      p: float) -> torch.Tensor:
    """Attention with dropout ``p`` on its weights; [B, h, Nq, d/h] like SDPA.

    CPU training in fp32 takes ``_DropoutAttention``; elsewhere (GPU kernels, autocast, p = 0)
    ``scaled_dot_product_attention`` is the better path.
    """
    if 0 < p < 1 and q.device.type == "cpu" and autocast_dtype("cpu") is None:
        return cast(torch.Tensor, _DropoutAttention.apply(q, k, v, allowed, p))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
