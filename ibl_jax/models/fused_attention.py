"""Attention on a CPU as one fused C++ kernel a direction (`ibl_jax/kernels/attention_cpu.cc`), through XLA's FFI.

XLA:CPU runs attention as whole-array passes over [B, H, L, L] logits and probabilities; the kernel takes one
(trial, head) and a block of query rows at a time and keeps everything in a core's cache. The backward is
FlashAttention's: it keeps only the output and each query's log-sum-exp and recomputes the probabilities.
Measured against `looped_attention` (docs/performance.md, row 38).

Sharding: an FFI call is opaque to XLA's partitioner, which would gather the batch onto every device; the calls
are wrapped in `custom_partitioning` so that each device runs the kernel on its own trials.

`available(head_dim)` says whether the kernel can serve: a CPU backend, the library built (`ibl_jax.kernels`)
and 16, 32, 48 or 64 features a head; `serves(tokens, head_dim, dtype)` whether it is the attention layer's path
(from `MIN_TOKENS` tokens). It has no dropout on the probabilities: training with attention dropout keeps the
pure-JAX paths. bf16 inputs with 32 or 64 features a head, on a CPU with AMX (Intel Sapphire Rapids and later),
take a bf16 forward whose two products run on AMX's tiles (`bf16_forward`, from `MIN_TOKENS_AMX` tokens;
docs/performance.md, row 46).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from ibl_jax import kernels

# From here up (NDT2's 302 tokens); at NDT1's 102 the paper model (64 features a head) ran its co-smoothing
# forwards no faster than through XLA (docs/performance.md, row 38).
MIN_TOKENS = 256
# bf16 on AMX from here up: 3x XLA's attention from 64 tokens, level at 32; NDT1's 102 tokens at paper size
# (64 features a head): co-smoothing +5-8 % (docs/performance.md, row 46).
MIN_TOKENS_AMX = 32
HEAD_DIMS = (16, 32, 48, 64)  # the kernel's instantiations (whole 16-float chunks)
BF16_HEAD_DIMS = (32, 64)  # the bf16 forward's (whole 32-feature tiles)
_FORWARD, _BACKWARD = "ibl_attention_forward", "ibl_attention_backward"
_FORWARD_BF16 = "ibl_attention_forward_bf16"


@functools.cache
def _registered() -> bool:
  lib = kernels.load("attention_cpu")
  if lib is None:
    return False
  jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(lib.IblAttentionForward), platform="cpu")
  jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(lib.IblAttentionBackward), platform="cpu")
  jax.ffi.register_ffi_target(_FORWARD_BF16, jax.ffi.pycapsule(lib.IblAttentionForwardBf16), platform="cpu")
  return True


@functools.cache
def _amx() -> bool:
  """The kernel was built with AMX and the OS grants its tiles (`IBL_JAX_CPU_AMX=0` says no)."""
  return kernels.amx_enabled() and _registered() and kernels.load("attention_cpu").IblAttentionBf16Available() == 1


def available(head_dim: int) -> bool:
  return head_dim in HEAD_DIMS and jax.default_backend() == "cpu" and _registered()


def serves(num_tokens: int, head_dim: int, dtype) -> bool:
  """Whether the kernel is the CPU's attention for these shapes (from MIN_TOKENS tokens; MIN_TOKENS_AMX for bf16
  that takes the AMX forward)."""
  if not available(head_dim):
    return False
  amx = jnp.dtype(dtype) == jnp.bfloat16 and bf16_forward(head_dim)
  return num_tokens >= (MIN_TOKENS_AMX if amx else MIN_TOKENS)


def bf16_forward(head_dim: int) -> bool:
  """Whether bf16 inputs take the kernel's bf16 forward on AMX (else they run the float32 kernel)."""
  return head_dim in BF16_HEAD_DIMS and jax.default_backend() == "cpu" and _amx()


def attention(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array, mask_BxLxL: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(d), masked) v; every query must see at least one key.

  Float32 throughout, but for bf16 inputs where the CPU has AMX (`bf16_forward`): their forward runs the
  products on its tiles, with the probabilities rounded to bf16 before P V (the softmax stays float32); the
  backward is the float32 kernel's on the same bf16 values.
  """
  if not _registered():  # registers the FFI targets in this process
    raise RuntimeError("the fused attention kernel is not built (see ibl_jax.kernels); check `available()` first")
  mask = mask_BxLxL.astype(bool)
  if q_BxLxHxD.dtype == jnp.bfloat16 and bf16_forward(q_BxLxHxD.shape[-1]):
    out = _attention_bf16(q_BxLxHxD, k_BxLxHxD.astype(jnp.bfloat16), v_BxLxHxD.astype(jnp.bfloat16), mask)
  else:
    f32 = lambda x: x.astype(jnp.float32)
    out = _attention(f32(q_BxLxHxD), f32(k_BxLxHxD), f32(v_BxLxHxD), mask)
  return out.astype(q_BxLxHxD.dtype)


def _scale(q) -> np.float32:
  return np.float32(q.shape[-1] ** -0.5)


def _forward_call(q, k, v, mask):
  B, L, H, _ = q.shape
  out_types = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((B, H, L), jnp.float32))
  return jax.ffi.ffi_call(_FORWARD, out_types)(q, k, v, mask, scale=_scale(q))


def _forward_bf16_call(q, k, v, mask):
  B, L, H, _ = q.shape
  out_types = (jax.ShapeDtypeStruct(q.shape, jnp.bfloat16), jax.ShapeDtypeStruct((B, H, L), jnp.float32))
  return jax.ffi.ffi_call(_FORWARD_BF16, out_types)(q, k, v, mask, scale=_scale(q))


def _backward_call(q, k, v, mask, out, lse, dout):
  out_types = (jax.ShapeDtypeStruct(q.shape, jnp.float32),) * 3
  return jax.ffi.ffi_call(_BACKWARD, out_types)(q, k, v, mask, out, lse, dout, scale=_scale(q))


def _specs(arg_shapes):
  """Batch and head axes of q's sharding; tokens and features stay whole on each device."""
  spec = tuple(arg_shapes[0].sharding.spec) + (None,) * 4
  return spec[0], spec[2]


def _sharded(call, result_specs):
  """`call` on each device's own trials: inputs [B, L, H, D] and the mask [B, L, L] split along B (and H)."""
  fn = custom_partitioning(call)

  def shardings(mesh, arg_shapes):
    b, h = _specs(arg_shapes)
    named = lambda *spec: NamedSharding(mesh, P(*spec))
    args = tuple(named(b, None, None) if len(a.shape) == 3 and i == 3 else
                 named(b, h, None) if len(a.shape) == 3 else named(b, None, h, None)
                 for i, a in enumerate(arg_shapes))
    results = tuple(named(*spec(b, h)) for spec in result_specs)
    return args, results

  def partition(mesh, arg_shapes, result_shape):
    args, results = shardings(mesh, arg_shapes)
    return mesh, call, results, args

  def infer(mesh, arg_shapes, result_shape):
    return shardings(mesh, arg_shapes)[1]

  operands = ["b i h d", "b j h d", "b j h d", "b i j"] + (["b i h d", "b h i", "b i h d"] if len(result_specs) == 3
                                                          else [])
  results = ["b i h d", "b j h d", "b j h d"] if len(result_specs) == 3 else ["b i h d", "b h i"]
  fn.def_partition(partition=partition, infer_sharding_from_operands=infer,
                   sharding_rule=f"{', '.join(operands)} -> {', '.join(results)}",
                   need_replication_factors=("i", "d", "j"))  # in order of first use (Shardy wants them sorted)
  return fn


_BxLxHxD = lambda b, h: (b, None, h, None)
_sharded_forward = _sharded(_forward_call, (_BxLxHxD, lambda b, h: (b, h, None)))
_sharded_backward = _sharded(_backward_call, (_BxLxHxD,) * 3)
_sharded_forward_bf16 = _sharded(_forward_bf16_call, (_BxLxHxD, lambda b, h: (b, h, None)))


def _with_kernel_backward(sharded_forward, dtype):
  """Attention through `sharded_forward` ((q, k, v, mask) -> (out, lse)) with the float32 kernel's backward
  (FlashAttention's: it recomputes the probabilities from lse) on float32 copies; gradients in `dtype`."""

  @jax.custom_vjp
  def attend(q, k, v, mask):
    return sharded_forward(q, k, v, mask)[0]

  def fwd(q, k, v, mask):
    out, lse = sharded_forward(q, k, v, mask)
    return out, (q, k, v, mask, out, lse)

  def bwd(residuals, dout):
    q, k, v, mask, out, lse = residuals
    f32 = lambda x: x.astype(jnp.float32)  # no-ops in float32
    grads = _sharded_backward(f32(q), f32(k), f32(v), mask, f32(out), lse, f32(dout))
    return tuple(g.astype(dtype) for g in grads) + (None,)

  attend.defvjp(fwd, bwd)
  return attend


_attention = _with_kernel_backward(_sharded_forward, jnp.float32)
_attention_bf16 = _with_kernel_backward(_sharded_forward_bf16, jnp.bfloat16)
