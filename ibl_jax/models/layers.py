"""Transformer building blocks shared by the NDT models: norms, RoPE, attention, MLP, pre-norm encoder layer.

Mixed precision follows one rule: parameters are float32, matmuls run in the compute `dtype` (float32 or
bfloat16), and norm statistics, attention logits and softmax are float32. Dropout modules are built without
rngs so the model state holds nothing but `nnx.Param`s; dropout keys come from the `rngs` passed at call time.

Submodule names (`ln1`, `attn.query`, `mlp.up_proj`, ...) mirror the original PyTorch NDT1 so that
checkpoint conversion is a name-by-name mapping.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from ibl_jax import fused_random
from ibl_jax.errors import UserError
from ibl_jax.models import fused_attention, looped_attention

Dtype = jnp.dtype


def compute_dtype(name: str) -> Dtype:
  """Maps the config string ('float32' | 'bfloat16') to a dtype."""
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if name not in dtypes:
    raise UserError(f"model.dtype must be one of {sorted(dtypes)}, got {name!r}")
  return jnp.dtype(dtypes[name])


# Float32 layers at least this wide (both sides) take `matmul_f32_accumulate`'s weight gradient on a CPU.
# Measured (docs/performance.md row 31): paper-size NDT1 (512-1336 wide) -8 to -10 % a train step; NDT2 small
# (64-128 wide, 4 devices) +9 %, NDT1 small no change.
MIN_WIDTH_IN_PLACE_GRAD = 256


def linear(in_features: int, out_features: int, *, dtype: Dtype, rngs: nnx.Rngs) -> nnx.Linear:
  """`nnx.Linear` computing in `dtype`; on a CPU its matmuls may go through `matmul_f32_accumulate`.

  - In bfloat16 always: they accumulate into float32 and cast the result back. XLA:CPU runs bf16 x bf16 -> f32
    on the CPU's bf16 dot instructions (AVX512-BF16: 2x its fp32 matmul) but a bf16-output matmul on a path
    slower than fp32.
  - In float32 for wide layers (`MIN_WIDTH_IN_PLACE_GRAD`): its weight gradient `x^T g` contracts x's rows in
    place, in XLA:CPU's Eigen dot, which reads x transposed while packing it. Autodiff's transposed product
    went to a YNNPACK dot, which takes no transposed left operand, so XLA copied a transposed activation or
    gradient for each weight gradient.
  - The weight gradient in bfloat16 as `transposed(x) @ g`: a product contracting x's rows in place goes to the
    Eigen dot, which has no bf16 kernel (XLA converts both operands to float32), where the transposed copy lets
    YNNPACK run it on the bf16 units (AVX512-BF16, AMX).

  On accelerators (not measured there) XLA's own matmuls are kept."""
  wide = min(in_features, out_features) >= MIN_WIDTH_IN_PLACE_GRAD
  if on_cpu() and (dtype == jnp.bfloat16 or wide):
    return nnx.Linear(in_features, out_features, dtype=dtype, dot_general=_linear_dot_general, rngs=rngs)
  return nnx.Linear(in_features, out_features, dtype=dtype, rngs=rngs)


def on_cpu() -> bool:
  """Whether the model runs on XLA:CPU, where `linear`, `explicit_attention` and `materialize_grad` take their
  CPU-specific paths (measured there; accelerators keep XLA's defaults)."""
  return jax.default_backend() == "cpu"


def _linear_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  del preferred_element_type
  if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or precision is not None or kwargs.get("out_sharding"):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)  # not nnx.Linear's
  return matmul_f32_accumulate(lhs, rhs)


@jax.custom_vjp
def matmul_f32_accumulate(x_MxI: jax.Array, w_IxO: jax.Array) -> jax.Array:
  """`x @ w` accumulated in float32, returned in x's dtype; its gradients likewise (autodiff's transposed
  matmuls would output bf16), the weight's as `x^T g` contracting x's rows in place (see `linear`)."""
  return _matmul(x_MxI, w_IxO, "...i,io->...o", x_MxI.dtype)


def _matmul(a, b, spec: str, dtype):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(dtype)


def _matmul_bwd(res, g_MxO):
  x_MxI, w_IxO = res
  dx = _matmul(g_MxO, w_IxO, "...o,io->...i", x_MxI.dtype)
  # float32: `transposed` is a swapaxes, which XLA folds into a product contracting x's rows in place
  x_IxM = transposed(x_MxI.reshape(-1, x_MxI.shape[-1]))
  return dx, _matmul(x_IxM, g_MxO.reshape(-1, g_MxO.shape[-1]), "im,mo->io", w_IxO.dtype)


def transposed(x_xMxI: jax.Array) -> jax.Array:
  """The last two axes of a 16-bit array swapped ([..., M, I] -> [..., I, M]), stored so.

  A plain `swapaxes` before a product is folded into the product's dimension numbers (and XLA:CPU then runs a
  bf16 product with a transposed left operand in float32 on Eigen, 6x slower than YNNPACK on AMX). Moving pairs
  of rows as one 32-bit word hides the transpose from that folding; the result is the same values. Other dtypes:
  a plain `swapaxes`.
  """
  if x_xMxI.dtype.itemsize != 2:
    return jnp.swapaxes(x_xMxI, -1, -2)
  *lead, m, i = x_xMxI.shape
  if m % 2:
    x_xMxI = jnp.pad(x_xMxI, [(0, 0)] * len(lead) + [(0, 1), (0, 0)])
  pairs = jnp.swapaxes(x_xMxI.reshape(*lead, -1, 2, i), -1, -2)  # [..., M/2, I, 2]
  words_xIxM2 = jnp.swapaxes(jax.lax.bitcast_convert_type(pairs, jnp.uint32), -1, -2)
  return jax.lax.bitcast_convert_type(words_xIxM2, x_xMxI.dtype).reshape(*lead, i, -1)[..., :m]


matmul_f32_accumulate.defvjp(lambda x, w: (matmul_f32_accumulate(x, w), (x, w)), _matmul_bwd)


@jax.custom_vjp
def batched_matmul_f32_accumulate(x_BxTxI: jax.Array, w_BxIxO: jax.Array) -> jax.Array:
  """Per-trial `x[b] @ w[b]` (the stitchers) in the inputs' dtype, accumulated in and returned as float32; its
  gradients are bf16 x bf16 -> f32 matmuls too (see `linear`)."""
  return jnp.einsum("bti,bio->bto", x_BxTxI, w_BxIxO, preferred_element_type=jnp.float32)


def _batched_bwd(res, g_BxTxO):
  x_BxTxI, w_BxIxO = res
  g_BxTxO = g_BxTxO.astype(x_BxTxI.dtype)
  return (_matmul(g_BxTxO, w_BxIxO, "bto,bio->bti", x_BxTxI.dtype),
          _matmul(transposed(x_BxTxI), g_BxTxO, "bit,bto->bio", w_BxIxO.dtype))


batched_matmul_f32_accumulate.defvjp(lambda x, w: (batched_matmul_f32_accumulate(x, w), (x, w)), _batched_bwd)


class ScaleNorm(nnx.Module):
  """`g * x / max(||x||, eps)` with one learned scalar g, initialised to sqrt(d) (Nguyen & Salazar 2019)."""

  def __init__(self, num_features: int, *, epsilon: float = 1e-5, dtype: Dtype | None = None):
    self.scale = nnx.Param(jnp.asarray(num_features**0.5, jnp.float32))
    self.epsilon = epsilon
    self.dtype = dtype

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x = x_BxLxD.astype(jnp.float32)  # the norm is a reduction: keep it in float32
    norm_BxLx1 = jnp.linalg.norm(x, axis=-1, keepdims=True)
    y = self.scale[...] * x / jnp.maximum(norm_BxLx1, self.epsilon)
    return y.astype(self.dtype or x_BxLxD.dtype)


def make_norm(cfg: ml_collections.ConfigDict, num_features: int, dtype: Dtype, rngs: nnx.Rngs) -> nnx.Module:
  """LayerNorm or ScaleNorm, as `cfg.norm` says; statistics in float32, output in `dtype`."""
  if cfg.norm == "layernorm":
    # Two-pass variance (not E[x^2] - E[x]^2), as torch computes it.
    return nnx.LayerNorm(
        num_features, epsilon=cfg.norm_eps, dtype=dtype, use_fast_variance=False, rngs=rngs
    )
  if cfg.norm == "scalenorm":
    return ScaleNorm(num_features, epsilon=cfg.norm_eps, dtype=dtype)
  raise UserError(f"model.norm must be 'layernorm' or 'scalenorm', got {cfg.norm!r}")


def apply_rope(x_BxLxHxD: jax.Array, positions_L: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding, in the rotate-half layout of HF Llama (and of the original NDT1)."""
  head_dim = x_BxLxHxD.shape[-1]
  inv_freq_K = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_LxK = positions_L.astype(jnp.float32)[:, None] * inv_freq_K[None, :]
  angles_LxD = jnp.concatenate([angles_LxK, angles_LxK], axis=-1)
  cos_1xLx1xD = jnp.cos(angles_LxD)[None, :, None, :]
  sin_1xLx1xD = jnp.sin(angles_LxD)[None, :, None, :]
  x = x_BxLxHxD.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos_1xLx1xD + rotated * sin_1xLx1xD).astype(x_BxLxHxD.dtype)


def explicit_attention(
    q_BxLxHxD: jax.Array,
    k_BxLxHxD: jax.Array,
    v_BxLxHxD: jax.Array,
    mask_BxLxL: jax.Array,
    dropout_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
  """softmax(q k^T / sqrt(d), masked) v, with an optional dropout on the probabilities.

  The same maths as `jax.nn.dot_product_attention` (float32 logits and softmax), spelled out because that
  function has no attention-probability dropout, and heads-first ([B, H, L, D] operands): XLA:CPU runs these
  batched matmuls 1.4–2.6× faster than with heads in the middle, or than `dot_product_attention`, whose backward
  is also 1.3–1.5× slower (docs/performance.md, row 21).
  """
  q_BxHxLxD, k_BxHxLxD, v_BxHxLxD = (jnp.transpose(x, (0, 2, 1, 3)) for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
  logits_BxHxLxL = jnp.einsum(
      "bhqd,bhkd->bhqk", q_BxHxLxD, k_BxHxLxD, preferred_element_type=jnp.float32
  )
  logits_BxHxLxL = logits_BxHxLxL * q_BxLxHxD.shape[-1] ** -0.5
  # Every row has its own key (the identity term of the mask), so no row is all -inf.
  logits_BxHxLxL = jnp.where(mask_BxLxL[:, None], logits_BxHxLxL, -jnp.inf)
  probs_BxHxLxL = jax.nn.softmax(logits_BxHxLxL, axis=-1)
  if dropout_fn is not None:
    probs_BxHxLxL = dropout_fn(probs_BxHxLxL)
  accumulate = jnp.float32 if on_cpu() else None  # see `linear`
  out_BxHxLxD = jnp.einsum("bhqk,bhkd->bhqd", probs_BxHxLxL.astype(v_BxLxHxD.dtype), v_BxHxLxD,
                           preferred_element_type=accumulate).astype(v_BxLxHxD.dtype)
  return jnp.transpose(out_BxHxLxD, (0, 2, 1, 3))


# `model.attention_impl`, on GPUs and TPUs only (CPUs take `explicit_attention` or `looped_attention`).
ATTENTION_IMPLS = ("xla", "cudnn")


class Attention(nnx.Module):
  """Multi-head self-attention with biases, a boolean [B, L, L] mask and optional RoPE."""

  def __init__(
      self,
      hidden_size: int,
      num_heads: int,
      *,
      dropout: float,
      attention_dropout: float,
      use_rope: bool,
      dtype: Dtype,
      rngs: nnx.Rngs,
      accelerator_impl: str = "xla",
  ):
    if hidden_size % num_heads:
      raise UserError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    if accelerator_impl not in ATTENTION_IMPLS:
      raise UserError(f"model.attention_impl {accelerator_impl!r}: use {' or '.join(ATTENTION_IMPLS)}")
    if accelerator_impl == "cudnn" and jnp.dtype(dtype) == jnp.float32:
      raise UserError("model.attention_impl='cudnn' needs model.dtype='bfloat16' (cuDNN's fused attention has no "
                      "float32 kernel)")
    self.num_heads = num_heads
    self.accelerator_impl = accelerator_impl
    self.use_rope = use_rope
    dense = lambda: linear(hidden_size, hidden_size, dtype=dtype, rngs=rngs)
    self.query, self.key, self.value = dense(), dense(), dense()
    self.out_proj = dense()
    self.attention_dropout = fused_random.Dropout(attention_dropout)
    self.dropout = fused_random.Dropout(dropout)

  def __call__(
      self,
      x_BxLxD: jax.Array,
      mask_BxLxL: jax.Array,
      positions_L: jax.Array | None,
      *,
      deterministic: bool,
      rngs: nnx.Rngs | None,
  ) -> jax.Array:
    B, L, D = x_BxLxD.shape
    split_heads = lambda y: y.reshape(B, L, self.num_heads, D // self.num_heads)
    q_BxLxHxK = split_heads(self.query(x_BxLxD))
    k_BxLxHxK = split_heads(self.key(x_BxLxD))
    v_BxLxHxK = split_heads(self.value(x_BxLxD))
    if self.use_rope:
      q_BxLxHxK = apply_rope(q_BxLxHxK, positions_L)
      k_BxLxHxK = apply_rope(k_BxLxHxK, positions_L)

    if (deterministic or self.attention_dropout.rate == 0.0) and not on_cpu():
      # Accelerators: XLA's attention (what `implementation=None` selects in JAX 0.10), or cuDNN's fused kernel
      # when the config asks for it. Probabilities with dropout take the explicit path below.
      out_BxLxHxK = jax.nn.dot_product_attention(
          q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask_BxLxL[:, None], implementation=self.accelerator_impl
      )
    elif on_cpu() and (deterministic or self.attention_dropout.rate == 0.0) \
        and fused_attention.serves(L, D // self.num_heads, q_BxLxHxK.dtype):
      # A CPU without probability dropout: one fused C++ kernel a direction.
      out_BxLxHxK = fused_attention.attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_BxLxL)
    elif on_cpu() and L >= looped_attention.MIN_TOKENS:
      # Long sequences on a CPU (NDT2): one head at a time keeps the [B, L, L] arrays in cache.
      rate = 0.0 if deterministic else self.attention_dropout.rate
      out_BxLxHxK = looped_attention.attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_BxLxL, dropout_rate=rate,
                                               key=rngs.dropout() if rate else None)
    else:
      drop = None
      if not deterministic and self.attention_dropout.rate > 0.0:
        drop = lambda p: self.attention_dropout(p, deterministic=False, rngs=rngs)
      out_BxLxHxK = explicit_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_BxLxL, drop)

    out_BxLxD = out_BxLxHxK.reshape(B, L, D)
    # The original drops the concatenated heads before the output projection; we keep that placement.
    out_BxLxD = self.dropout(out_BxLxD, deterministic=deterministic, rngs=rngs)
    return self.out_proj(out_BxLxD)


def gelu(x: jax.Array, *, approximate: bool) -> jax.Array:
  """GELU computed in float32 and rounded once to x's dtype (as PyTorch's bf16 GELU); exact as PyTorch writes it,
  x/2 (1 + erf(x/sqrt 2)).

  In bf16, `jax.nn.gelu` rounds each of its dozen steps to bf16, which XLA:CPU ran as slowly as the up
  projection before it; its exact form goes through erfc (both of erfc's branches, one with an exp), 2.2x the
  time of erf's one polynomial on a CPU (docs/performance.md, row 47). The erf form differs by at most 1e-6
  (float32), in the far negative tail where GELU is about 0.
  """
  x32 = x.astype(jnp.float32)
  if approximate:
    y = jax.nn.gelu(x32, approximate=True)
  else:
    y = 0.5 * x32 * (1.0 + jax.lax.erf(x32 * np.float32(0.5**0.5)))
  return y.astype(x.dtype)


class MLP(nnx.Module):
  """hidden -> mlp_size -> GELU -> hidden, then dropout."""

  def __init__(
      self,
      hidden_size: int,
      mlp_size: int,
      *,
      dropout: float,
      gelu_approximate: bool,
      dtype: Dtype,
      rngs: nnx.Rngs,
  ):
    self.up_proj = linear(hidden_size, mlp_size, dtype=dtype, rngs=rngs)
    self.down_proj = linear(mlp_size, hidden_size, dtype=dtype, rngs=rngs)
    self.gelu_approximate = gelu_approximate
    self.dropout = fused_random.Dropout(dropout)

  def __call__(self, x_BxLxD: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    h_BxLxM = gelu(self.up_proj(x_BxLxD), approximate=self.gelu_approximate)
    return self.dropout(self.down_proj(h_BxLxM), deterministic=deterministic, rngs=rngs)


@jax.custom_vjp
def materialize_grad(x: jax.Array, anchor: jax.Array) -> jax.Array:
  """Identity whose gradient is computed into its own buffer (a fusion boundary in the backward pass), on a CPU.

  Without it, XLA:CPU fuses the residual stream's gradient through every layer into the loop fusion of each
  weight-gradient matmul's transposed operand: recomputed once per layer and read in transposed (strided) order,
  21 % of the paper-size train step. `optimization_barrier` does not stop that fusion on the CPU (its pass removes
  barriers first); a conditional does: its predicate is never false for a finite `anchor`, and its other branch
  computes the same values. The anchor is a replicated scalar (a parameter's element): a predicate read from the
  batch-split gradient itself costs an all-reduce, a sync point of the devices, per boundary (row 24). Outputs and
  gradients are unchanged. Not on accelerators, where a conditional may wait for the host and this fusion does
  not arise.
  """
  del anchor
  return x


def _materialize(anchor: jax.Array, g_BxLxD: jax.Array) -> jax.Array:
  if not on_cpu():
    return g_BxLxD
  return jax.lax.cond(anchor == anchor, lambda g: g, lambda g: g + 0 * g, g_BxLxD)


materialize_grad.defvjp(lambda x, anchor: (x, anchor), lambda anchor, g: (_materialize(anchor, g), None))


# Tokens from which an encoder layer on a CPU computes its second norm and its output into their own buffers.
MIN_TOKENS_FORWARD_BOUNDARY = 256


@jax.custom_vjp
def materialize(x: jax.Array, anchor: jax.Array) -> jax.Array:
  """Identity computed into its own buffer (a fusion boundary in the forward pass) on a CPU; the gradient passes.

  Over NDT2's 300-600 tokens XLA:CPU's YNNPACK fusions pull element-wise work in front of a product: the
  LayerNorm before the MLP's up projection (in bf16, two devices: 30 ms a layer at [4816, 512] x [512, 1024]
  against 16 ms for the product after a materialised norm), and the last layer's whole attention output, MLP and
  the final norm's statistics, with GELU's constants broadcast to [B, L, 1024] arrays beforehand
  (docs/performance.md, row 50). The same conditional as `materialize_grad`'s stops it.
  """
  return _materialize(anchor, x)


materialize.defvjp(lambda x, anchor: (_materialize(anchor, x), None), lambda _, g: (g, None))


class EncoderLayer(nnx.Module):
  """Pre-norm transformer layer: x + Attn(Norm(x)), then x + MLP(Norm(x))."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, dtype: Dtype, rngs: nnx.Rngs):
    H = cfg.hidden_size
    self.ln1 = make_norm(cfg, H, dtype, rngs)
    self.attn = Attention(
        H,
        cfg.num_heads,
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        use_rope=cfg.position == "rope",
        dtype=dtype,
        rngs=rngs,
        accelerator_impl=cfg.get("attention_impl", "xla"),  # absent from configs saved before it existed
    )
    self.ln2 = make_norm(cfg, H, dtype, rngs)
    self.mlp = MLP(
        H,
        cfg.mlp_size,
        dropout=cfg.dropout,
        gelu_approximate=cfg.gelu_approximate,
        dtype=dtype,
        rngs=rngs,
    )

  def __call__(
      self,
      x_BxLxD: jax.Array,
      mask_BxLxL: jax.Array,
      positions_L: jax.Array | None,
      *,
      deterministic: bool,
      rngs: nnx.Rngs | None,
  ) -> jax.Array:
    # The residual stream stays float32 (x is float32); only the branches compute in `dtype`.
    # Fusion boundaries for the backward pass on a CPU at both ends: the first layer's input gradient is the
    # embedding's, which nothing else materialises.
    anchor = self.attn.out_proj.bias[...][0]
    x_BxLxD = materialize_grad(x_BxLxD, anchor)
    x_BxLxD = x_BxLxD + self.attn(
        self.ln1(x_BxLxD), mask_BxLxL, positions_L, deterministic=deterministic, rngs=rngs
    )
    # Forward boundaries over long sequences (see `materialize`); over NDT1's ~100 tokens they only cost.
    bound = on_cpu() and x_BxLxD.shape[1] >= MIN_TOKENS_FORWARD_BOUNDARY
    h_BxLxD = self.ln2(x_BxLxD)
    x_BxLxD = x_BxLxD + self.mlp(materialize(h_BxLxD, anchor) if bound else h_BxLxD,
                                 deterministic=deterministic, rngs=rngs)
    return materialize_grad(materialize(x_BxLxD, anchor) if bound else x_BxLxD, anchor)
