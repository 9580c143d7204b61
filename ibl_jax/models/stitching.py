"""Per-session linear layers held as stacked parameters (docs/design.md §4).

Sessions record different neuron counts N_s. Neurons are padded to N_max and every session owns one row of a
stacked kernel `[S, in, out]` (stitch-in: `[S, N_max, C]`; stitch-out: `[S, H, N_max]`). Each trial gathers
the row of its session, so one compiled function serves every session and a batch may mix sessions.
Gathering is differentiable: a session absent from the batch gets exactly zero gradient on its row.

Padded input neurons carry zeros, so their kernel rows never matter; padded output neurons are computed and
ignored downstream (losses and metrics mask them).
"""

import jax
import jax.numpy as jnp
from flax import nnx
from ibl_jax.models import layers

# Fan-in over the `in` axis of each session's [in, out] slice, as nnx.Linear's default (LeCun normal).
_kernel_init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))


class SessionLinear(nnx.Module):
  """y = x @ kernel[session] + bias[session], one [in, out] linear map per session.

  Attributes:
    kernel: Param [num_sessions, in_features, out_features].
    bias: Param [num_sessions, out_features].
  """

  def __init__(
      self,
      num_sessions: int,
      in_features: int,
      out_features: int,
      *,
      dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.kernel = nnx.Param(_kernel_init(rngs.params(), (num_sessions, in_features, out_features)))
    self.bias = nnx.Param(jnp.zeros((num_sessions, out_features), jnp.float32))
    self.dtype = dtype

  def __call__(self, x_BxTxI: jax.Array, session_idx_B: jax.Array) -> jax.Array:
    """Returns float32 [B, T, out]; the matmul runs in `dtype` and accumulates in float32."""
    kernel_BxIxO = self.kernel[...][session_idx_B]
    bias_BxO = self.bias[...][session_idx_B]
    if self.dtype == jnp.bfloat16 and layers.on_cpu():  # the CPU's bf16 dot path (layers.linear)
      y_BxTxO = layers.batched_matmul_f32_accumulate(x_BxTxI.astype(self.dtype), kernel_BxIxO.astype(self.dtype))
    else:
      y_BxTxO = jnp.einsum("bti,bio->bto", x_BxTxI.astype(self.dtype), kernel_BxIxO.astype(self.dtype),
                           preferred_element_type=jnp.float32)
    return y_BxTxO + bias_BxO[:, None, :]
