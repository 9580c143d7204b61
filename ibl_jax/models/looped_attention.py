"""Attention one head at a time, with a FlashAttention-style backward: long token sequences on a CPU.

XLA:CPU runs attention as whole-array fusions. At NDT2's 302 tokens with 4 heads and 8 trials a device, each
[B, H, L, L] array is 12 MB, far beyond a core's cache. The softmax, its backward and the two products then
stream such arrays through memory about ten times.

Here a loop (`lax.map`) takes one head at a time, so the [B, L, L] arrays of an iteration are a quarter or an
eighth of that. The custom backward keeps only the output and each query's log-sum-exp, recomputes the
probabilities head by head, and uses FlashAttention's identity rowsum(dP ∘ P) = rowsum(dO ∘ O). The loop runs
over heads, not trials, because the trials are split over the devices.

Measured against `layers.explicit_attention` (docs/performance.md, row 24): faster from about 300 tokens,
slower at NDT1's 102, so `layers.Attention` uses it from `MIN_TOKENS` up.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ibl_jax import fused_random

MIN_TOKENS = 256  # measured crossover: at 202 tokens a loop was 1.15-1.45x slower, at 302 1.6x faster


def attention(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array, mask_BxLxL: jax.Array, *,
              dropout_rate: float = 0.0, key: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(d), masked) v in float32, dropping probabilities at `dropout_rate` with `key`.

  Every query must see at least one key (ours see themselves), so no row of the softmax is empty.
  """
  if dropout_rate and key is None:
    raise ValueError("dropout_rate > 0 needs a key")
  heads_first = lambda x: jnp.transpose(x, (2, 0, 1, 3)).astype(jnp.float32)  # [H, B, L, D]
  out_HxBxLxD = _attention(heads_first(q_BxLxHxD), heads_first(k_BxLxHxD), heads_first(v_BxLxHxD), mask_BxLxL,
                           float(dropout_rate), key)
  return jnp.transpose(out_HxBxLxD, (1, 2, 0, 3)).astype(q_BxLxHxD.dtype)


def _probs_unnormalised(q_BxLxD, k_BxLxD, mask_BxLxL, shift_BxLx1=None):
  """exp(logits - shift), masked entries 0; the shift is the row max (forward) or the log-sum-exp (backward)."""
  logits = jnp.einsum("bqd,bkd->bqk", q_BxLxD, k_BxLxD) * q_BxLxD.shape[-1] ** -0.5
  logits = jnp.where(mask_BxLxL, logits, -jnp.inf)
  if shift_BxLx1 is None:
    shift_BxLx1 = jnp.max(logits, axis=-1, keepdims=True)
  return jnp.exp(logits - shift_BxLx1), shift_BxLx1


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_HxBxLxD, k_HxBxLxD, v_HxBxLxD, mask_BxLxL, rate, key):
  return _forward(q_HxBxLxD, k_HxBxLxD, v_HxBxLxD, mask_BxLxL, rate, key)[0]


def _forward(q_HxBxLxD, k_HxBxLxD, v_HxBxLxD, mask_BxLxL, rate, key):
  def one_head(xs):
    q, k, v, h = xs
    p, row_max = _probs_unnormalised(q, k, mask_BxLxL)
    total = jnp.sum(p, axis=-1, keepdims=True)
    kept = None
    if rate:  # kept for the backward: cheaper than drawing the bits again
      kept = fused_random.bernoulli(jax.random.fold_in(key, h), 1.0 - rate, p.shape)
      p = jnp.where(kept, p / (1.0 - rate), 0.0)
    return jnp.einsum("bqk,bkd->bqd", p, v) / total, row_max + jnp.log(total), kept

  H = q_HxBxLxD.shape[0]
  out, lse_HxBxLx1, kept_HxBxLxL = jax.lax.map(one_head, (q_HxBxLxD, k_HxBxLxD, v_HxBxLxD, jnp.arange(H)))
  return out, (q_HxBxLxD, k_HxBxLxD, v_HxBxLxD, mask_BxLxL, kept_HxBxLxL, out, lse_HxBxLx1)


def _backward(rate, residuals, dout_HxBxLxD):
  q_HxBxLxD, k_HxBxLxD, v_HxBxLxD, mask_BxLxL, kept_HxBxLxL, out, lse_HxBxLx1 = residuals
  # rowsum(dP ∘ P) over keys equals rowsum(dO ∘ O) over features (with dropout too): [L, D] instead of [L, L].
  delta_HxBxLx1 = jnp.sum(dout_HxBxLxD * out, axis=-1, keepdims=True)
  scale = q_HxBxLxD.shape[-1] ** -0.5

  def one_head(xs):
    q, k, v, dout, lse, delta, kept = xs
    p, _ = _probs_unnormalised(q, k, mask_BxLxL, lse)  # the normalised probabilities
    dp = jnp.einsum("bqd,bkd->bqk", dout, v)
    p_used = p
    if rate:
      p_used = jnp.where(kept, p / (1.0 - rate), 0.0)
      dp = jnp.where(kept, dp / (1.0 - rate), 0.0)
    dlogits = p * (dp - delta) * scale
    # dk and dv contract over queries, the rows of both operands. Written as [B, D, L] results with the small
    # [B, L, D] operand in front, XLA:CPU runs them 1.7x faster than as p^T-first [B, L, D] products (whose large
    # [B, L, L] operand it reads transposed); the loop's outputs are turned back once, [H, B, D, L] at a time.
    dk_BxDxL = jnp.einsum("bqd,bqk->bdk", q, dlogits)
    dv_BxDxL = jnp.einsum("bqd,bqk->bdk", dout, p_used)
    return jnp.einsum("bqk,bkd->bqd", dlogits, k), dk_BxDxL, dv_BxDxL

  dq, dk_HxBxDxL, dv_HxBxDxL = jax.lax.map(
      one_head, (q_HxBxLxD, k_HxBxLxD, v_HxBxLxD, dout_HxBxLxD, lse_HxBxLx1, delta_HxBxLx1, kept_HxBxLxL))
  return dq, jnp.swapaxes(dk_HxBxDxL, -1, -2), jnp.swapaxes(dv_HxBxDxL, -1, -2), None, None


_attention.defvjp(_forward, _backward)
