"""Compute kernels that beat torch's defaults on a CPU: dropout, attention with dropout, autocast.

Every model reaches these through ``retr.models.layers``; keeping them apart keeps the layers
readable as equations, and lets the training loss ask which autocast dtype is in force.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
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


ATTENTION_CHUNK = 256  # on the CPU, windows longer than this attend in chunks of queries
CHUNK_BYTES = 32 * 2**20  # one chunk's fp32 scores [B, h, c, N] stay under this (ours)


def chunk_rows(batch_heads: int, keys: int, most: int = ATTENTION_CHUNK) -> int:
    """Queries per chunk of ``chunked_attention``: at most ``most``, and few enough that one
    chunk's [B·h, c, N] scores fit ``CHUNK_BYTES``. A fixed row count would let the transient
    scores, probabilities and their gradients (about four of them in the backward pass) grow
    with B·N: 0.5 GB each at B = 128, two heads, N = 2,048. Smaller chunks also skip more of
    the causally masked keys."""
    return max(1, min(most, CHUNK_BYTES // (4 * batch_heads * keys)))


def query_mask(real: torch.Tensor, causal: bool, rows: torch.Tensor,
               keys_on: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 1, c, K] bool: which of the first K keys the queries at absolute positions ``rows``
    ([c], or [B, c] when each row's queries sit elsewhere) may read (the rule of
    ``layers.attention_mask``, built for these rows only). ``keys_on`` [B, K]: only these keys
    are readable (key-gated pathway attention), and a real query always reads itself."""
    b, n = real.shape  # the keys read (a causal chunk reads up to its last query)
    keys = torch.arange(n, device=real.device)  # [K]
    at = rows.expand(b, -1) if rows.dim() == 1 else rows  # [B, c]
    allowed = (real if keys_on is None else keys_on)[:, None, :]  # [B, 1, K] readable keys
    if causal:
        allowed = allowed & (keys[None, None, :] <= at[:, :, None])  # [B, c, K] k <= q
    q_real = torch.gather(real, 1, at.clamp_max(n - 1))[:, :, None]  # [B, c, 1]
    eye = keys[None, None, :] == at[:, :, None]  # [B, c, K]
    if keys_on is not None:
        return ((q_real & allowed) | eye)[:, None]
    return ((q_real & allowed) | (~q_real & eye))[:, None]  # [B, 1, c, K]


class _ChunkedAttention(torch.autograd.Function):
    """Dropout(Softmax(Q K^T / sqrt(d_h) | allowed)) V in chunks of ``chunk`` queries.

    Neither pass ever holds more than [B, h, chunk, N] of scores: the forward keeps only the
    log-sum-exp of each query's row [B, h, Nq], and the backward recomputes each chunk's
    probabilities (and its dropout mask, from ``seed``) as flash attention does. Memory grows
    linearly with the window N at a fixed chunk, for one more score matmul in the backward. A
    causal chunk reads only the keys up to its last query (the masked future is never
    computed: half the score work of the [N, N] path). The mask is built per chunk from
    ``real`` [B, N] (never [B, N, N]).
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor,
                causal: bool, p: float, seed: int, chunk: int,
                rows: torch.Tensor | None, keys_on: torch.Tensor | None) -> torch.Tensor:
        scale = 1.0 / math.sqrt(q.shape[-1])
        gen = torch.Generator(device=q.device).manual_seed(seed) if p > 0 else None
        y = torch.empty_like(q)  # [B, h, Nq, d/h]
        lse = q.new_empty(q.shape[:3])  # [B, h, Nq]
        for start, stop, keys, mask in _chunks(q, k, real, causal, chunk, rows, keys_on):
            scores = torch.matmul(q[:, :, start:stop] * scale, k[:, :, :keys].transpose(-2, -1))
            scores.masked_fill_(~mask, float("-inf"))  # [B, h, c, K]
            row_lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [B, h, c, 1]
            probs = scores.sub_(row_lse).exp_()  # [B, h, c, K]
            if gen is not None:
                keep = torch.rand(probs.shape, generator=gen, device=q.device) >= p
                probs = probs.mul_(keep).mul_(1.0 / (1.0 - p))
            y[:, :, start:stop] = torch.matmul(probs, v[:, :, :keys])
            lse[:, :, start:stop] = row_lse.squeeze(-1)
        ctx.save_for_backward(q, k, v, real, lse, rows, keys_on)
        ctx.causal, ctx.p, ctx.seed, ctx.chunk, ctx.scale = causal, p, seed, chunk, scale
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, real, lse, rows, keys_on = ctx.saved_tensors
        p, scale = ctx.p, ctx.scale
        gen = torch.Generator(device=q.device).manual_seed(ctx.seed) if p > 0 else None
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for start, stop, keys, mask in _chunks(q, k, real, ctx.causal, ctx.chunk, rows, keys_on):
            qc, dyc, kc, vc = q[:, :, start:stop], dy[:, :, start:stop], k[:, :, :keys], \
                v[:, :, :keys]
            scores = torch.matmul(qc * scale, kc.transpose(-2, -1))  # [B, h, c, K]
            scores.masked_fill_(~mask, float("-inf"))
            probs = scores.sub_(lse[:, :, start:stop, None]).exp_()  # [B, h, c, K]
            dp = torch.matmul(dyc, vc.transpose(-2, -1))  # [B, h, c, K] dL/d(dropped probs)
            if gen is not None:
                keep = torch.rand(probs.shape, generator=gen, device=q.device) >= p
                c = 1.0 / (1.0 - p)
                dv[:, :, :keys] += torch.matmul((probs * keep).mul_(c).transpose(-2, -1), dyc)
                dp.mul_(keep).mul_(c)
            else:
                dv[:, :, :keys] += torch.matmul(probs.transpose(-2, -1), dyc)
            ds = dp.sub_((dp * probs).sum(dim=-1, keepdim=True)).mul_(probs)  # softmax backward
            dq[:, :, start:stop] = torch.matmul(ds, kc).mul_(scale)
            dk[:, :, :keys] += torch.matmul(ds.transpose(-2, -1), qc).mul_(scale)
        return dq, dk, dv, None, None, None, None, None, None, None


def _chunks(q: torch.Tensor, k: torch.Tensor, real: torch.Tensor, causal: bool, chunk: int,
            rows: torch.Tensor | None = None, keys_on: torch.Tensor | None = None,
            ) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """(first query, end, keys read, mask [B, 1, c, keys]) per chunk of queries: the Nq queries
    are the last Nq of the N key positions, or at ``rows`` [B, Nq]; a causal chunk reads keys
    up to its last query; ``keys_on`` [B, N] restricts the readable keys (see query_mask)."""
    nq, n = q.shape[2], k.shape[2]
    for start in range(0, nq, chunk):
        stop = min(start + chunk, nq)
        if rows is None:
            at = torch.arange(n - nq + start, n - nq + stop, device=q.device)  # [c] absolute
            keys = n - nq + stop if causal else n
        else:
            at = rows[:, start:stop]  # [B, c]
            keys = int(at.max()) + 1 if causal else n
        on = None if keys_on is None else keys_on[:, :keys]
        yield start, stop, keys, query_mask(real[:, :keys], causal, at, on)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor,
                      causal: bool, p: float = 0.0, seed: int = 0,
                      chunk: int | None = None, rows: torch.Tensor | None = None,
                      keys_on: torch.Tensor | None = None) -> torch.Tensor:
    """Masked attention with dropout ``p`` on its weights, [B, h, Nq, d/h], in memory linear in
    the window: the Nq queries are the last Nq of the N key positions (or at the positions
    ``rows`` [B, Nq]: gathered queries), ``real`` [B, N] marks real keys (``keys_on`` [B, N]
    the readable ones, when only some are: every real query reads itself then), and the
    dropout masks are drawn from ``seed``. ``chunk``: queries per chunk (default
    ``chunk_rows``: under ``CHUNK_BYTES`` of scores)."""
    if chunk is None:
        chunk = chunk_rows(q.shape[0] * q.shape[1], k.shape[2])
    return cast(torch.Tensor, _ChunkedAttention.apply(q, k, v, real, causal, p, seed, chunk,
                                                      rows, keys_on))


def causal_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            chunk: int = 64) -> torch.Tensor:
    """[B, h, N, d_v]: Σ_{j <= i} (q_i · k_j) v_j for every i, without an [N, N] matrix.

    Chunks of ``chunk`` positions: inside a chunk the masked [c, c] products, across chunks the
    running sum of k_j v_j^T ([d, d_v] per chunk). Time O(N c d + N d d_v), memory O(N c).
    Zero the keys of padding positions to leave them out.
    """
    b, h, n, d = q.shape
    pad = (-n) % chunk
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    m = (n + pad) // chunk
    qc, kc, vc = (t.reshape(b, h, m, chunk, t.shape[-1]) for t in (q, k, v))  # [B, h, M, c, .]
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()  # [c, c] j <= i
    local = (qc @ kc.transpose(-2, -1)).masked_fill_(~tril, 0.0) @ vc  # [B, h, M, c, d_v]
    kv = kc.transpose(-2, -1) @ vc  # [B, h, M, d, d_v] per chunk
    before = torch.cumsum(kv, dim=2) - kv  # [B, h, M, d, d_v] the earlier chunks' sum
    out = local + qc @ before  # [B, h, M, c, d_v]
    return out.reshape(b, h, m * chunk, -1)[:, :, :n]
