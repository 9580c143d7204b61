"""NDT2 (Joel Ye et al. 2023) as the MtM paper's `STPatch`: space-time patches of neurons × bins as tokens.

  spikes [B, T, N_max]   (N_max = n_max; padded neurons and bins are zeroed, never seen as real)
    -> patches: pad to Tp·Ft bins and S·F neurons; token k = t·S + s (time-major) holds bins
       [t·Ft, (t+1)·Ft) × neurons [s·F, (s+1)·F), flattened (bin, neuron) -> C = Ft·F values
    -> Linear(C -> embed_mult·C) -> act · embed_scale -> Linear(-> H)
    -> + Norm(space_pos[s]) + Norm(time_pos[t]) -> embed dropout
    -> each trial's real patches first, then its padded ones (`real_first`; undone after the final norm)
    -> [session token, prompt token, patches]   (prefix tokens: no position embedding)
    -> num_layers pre-norm encoder layers -> final norm -> drop the prefix
    -> decoder Linear(H -> C) -> un-patch -> log-rates [B, T, N_max], float32

F = patch_neurons, Ft = patch_bins, S = ceil(N_max / F) space patches, Tp = ceil(T / Ft) time patches.

Our default (`compat="none"`): each trial's neuron count comes from its session (`session_neurons`), so a batch
may mix sessions; padded neuron slots are zero and a patch (or bin) without any real neuron (bin) is masked as a
key, per trial, and as a query sees only itself. In the causal scheme a token sees the prefix and the tokens of
time patches <= its own, and the prefix sees only the prefix: with Ft = 1 the output at bin t depends on no input
after t.

`compat="original"` reproduces the original STPatch for imported checkpoints (tests/testdata/mtm_ndt2_small):
padded neurons hold -1 (the original loader's pad value; padded bins are taken as given, as there); the partly filled patch's padded slots are copies of the
previous patch's last neurons; neuron count and session token come from trial 0; patch masks are OR-ed over the
batch; the "causal" context is the original's tiled triangle over token indices (k' mod Tp <= k mod Tp, not
causal when S > 1), and prefix tokens see and are seen by every token; S = max_neurons / F, the original's.

`causal` and `prompt_idx` are traced values, so one compiled function serves every masking scheme and session.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from ml_collections import config_dict

from ibl_jax import fused_random
from ibl_jax import masking
from ibl_jax.errors import UserError
from ibl_jax.models import layers
from ibl_jax.models import torch_names as tn
from ibl_jax.models.torch_names import ConvertError, Name, TorchCheckpoint, TorchSession

_EMBED_ACTS = {"softsign": jax.nn.soft_sign, "identity": lambda x: x}
PAD_VALUE = -1.0  # what the original loader writes into padded neurons and bins (compat mode only)


class NDT2(nnx.Module):
  """Space-time patch transformer; returns float32 log-rates [B, T, N_max].

  Param tree: embed_spikes, projection, embed_space_pos/embedding [ceil(max_neurons/F), H], space_pos_norm,
  embed_time_pos/embedding [ceil(max_bins/Ft), H], time_pos_norm, embed_session/embedding [num_sessions, H],
  embed_prompt/embedding [num_prompts, H], layers/{l}/..., out_norm, decoder [H, C]; with model.embed_region,
  embed_region/embedding [num_regions, H] and region_norm.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, num_sessions: int, n_max: int,
               session_neurons: Sequence[int] | None = None, session_regions=None, rngs: nnx.Rngs):
    if cfg.embed_act not in _EMBED_ACTS:
      raise UserError(f"model.embed_act must be one of {sorted(_EMBED_ACTS)}, got {cfg.embed_act!r}")
    if cfg.compat not in ("none", "original"):
      raise UserError(f"model.compat must be 'none' or 'original', got {cfg.compat!r}")
    if cfg.patch_neurons < 1 or cfg.patch_bins < 1:
      raise UserError(f"model.patch_neurons and model.patch_bins must be >= 1, got {cfg.patch_neurons}, "
                      f"{cfg.patch_bins}")
    if n_max > cfg.max_neurons:
      raise UserError(f"sessions have up to {n_max} neurons, more than model.max_neurons={cfg.max_neurons}")
    if cfg.compat == "original" and cfg.patch_bins != 1:
      raise UserError("model.compat='original' needs model.patch_bins=1 (the original un-patches wrongly otherwise)")
    dtype = layers.compute_dtype(cfg.dtype)
    F, Ft, H = cfg.patch_neurons, cfg.patch_bins, cfg.hidden_size
    C = F * Ft
    E = cfg.embed_mult * C

    # Plain hashable attributes only: they become part of the static graphdef.
    self.n_max = n_max
    self.session_neurons = tuple(int(n) for n in (session_neurons or [n_max] * num_sessions))
    self.patch_neurons, self.patch_bins = F, Ft
    self.compat = cfg.compat
    # The original sizes its space patches by the padded width it was built for, and its causal mask by them.
    self.num_space = math.ceil((cfg.max_neurons if cfg.compat == "original" else n_max) / F)
    self.max_bins = cfg.max_bins
    self.embed_act = cfg.embed_act
    self.embed_scale = float(cfg.embed_scale)
    self.dropout_rates = (cfg.embed_dropout, cfg.dropout, cfg.attention_dropout)
    self.num_prefix = int(cfg.use_session) + int(cfg.use_prompt)

    self.embed_spikes = layers.linear(C, E, dtype=dtype, rngs=rngs)
    self.projection = layers.linear(E, H, dtype=dtype, rngs=rngs)
    self.embed_space_pos = nnx.Embed(math.ceil(cfg.max_neurons / F), H, rngs=rngs)
    self.space_pos_norm = layers.make_norm(cfg, H, jnp.float32, rngs)
    self.embed_time_pos = nnx.Embed(math.ceil(cfg.max_bins / Ft), H, rngs=rngs)
    self.time_pos_norm = layers.make_norm(cfg, H, jnp.float32, rngs)
    self.embed_dropout = fused_random.Dropout(cfg.embed_dropout)
    self.embed_session = nnx.Embed(num_sessions, H, rngs=rngs) if cfg.use_session else None
    self.embed_prompt = nnx.Embed(cfg.num_prompts, H, rngs=rngs) if cfg.use_prompt else None
    self.layers = nnx.List([layers.EncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
    self.out_norm = layers.make_norm(cfg, H, dtype, rngs)
    self.decoder = layers.linear(H, C, dtype=dtype, rngs=rngs)
    # Optional (the original's embed_region): each space patch's majority region, embedded and normed, added to
    # its tokens. The table [S, num_space] is static: a session's neurons keep their regions.
    embed_region = cfg.get("embed_region", False)
    self.patch_regions = None
    if embed_region:
      if session_regions is None:
        raise UserError("model.embed_region=True needs each session's neuron regions (session_regions)")
      self.patch_regions = patch_regions(session_regions, self.num_space, F)
      top = max((max(row) for row in self.patch_regions), default=0)
      if top >= cfg.num_regions:
        raise UserError(f"region id {top} does not fit model.num_regions={cfg.num_regions}; raise it")
    self.embed_region = nnx.Embed(cfg.num_regions, H, rngs=rngs) if embed_region else None
    self.region_norm = layers.make_norm(cfg, H, jnp.float32, rngs) if embed_region else None

  def __call__(
      self,
      spikes_BxTxN: jax.Array,
      time_mask_BxT: jax.Array,
      session_idx_B: jax.Array,
      prompt_idx: jax.Array | int,
      causal: jax.Array | bool,
      *,
      deterministic: bool = True,
      rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Returns log-rates [B, T, N_max] in float32 (the call of every model family, ibl_jax/models)."""
    T, N = spikes_BxTxN.shape[1:]
    x_BxKxH, _ = self._encode_tokens(spikes_BxTxN, time_mask_BxT, session_idx_B, prompt_idx, causal,
                                     deterministic=deterministic, rngs=rngs)
    y_BxKxC = self.decoder(x_BxKxH).astype(jnp.float32)
    return self._unpatch(y_BxKxC, T, N)

  def encode(self, spikes_BxTxN, time_mask_BxT, session_idx_B, prompt_idx, causal, *, deterministic: bool = True,
             rngs: nnx.Rngs | None = None) -> jax.Array:
    """The encoder's output per bin, [B, T, H] float32: each time patch's mean over its real space patches,
    repeated over the patch's bins (a bin's vector then summarises every neuron, as NDT1's does)."""
    B, T, _ = spikes_BxTxN.shape
    x_BxKxH, key_real_BxK = self._encode_tokens(spikes_BxTxN, time_mask_BxT, session_idx_B, prompt_idx, causal,
                                                deterministic=deterministic, rngs=rngs)
    Tp, S = self._grid(T)
    x_BxTpxSxH = x_BxKxH.astype(jnp.float32).reshape(B, Tp, S, -1)
    real_BxTpxSx1 = key_real_BxK.reshape(B, Tp, S, 1).astype(jnp.float32)
    pooled_BxTpxH = (x_BxTpxSxH * real_BxTpxSx1).sum(2) / jnp.maximum(real_BxTpxSx1.sum(2), 1.0)
    return jnp.repeat(pooled_BxTpxH, self.patch_bins, axis=1)[:, :T]

  def _encode_tokens(self, spikes_BxTxN, time_mask_BxT, session_idx_B, prompt_idx, causal, *, deterministic,
                     rngs) -> tuple[jax.Array, jax.Array]:
    """The patch tokens after the final norm, prefix dropped, [B, K, H], and whether each is real [B, K]."""
    B, T, N = spikes_BxTxN.shape
    if N != self.n_max:
      raise UserError(f"spikes have {N} neurons, the model was built for n_max={self.n_max}")
    if T > self.max_bins:
      raise UserError(f"{T} time bins exceed model.max_bins={self.max_bins}")
    if not deterministic and rngs is None and any(self.dropout_rates):
      raise ValueError("deterministic=False needs `rngs` with a 'dropout' stream")
    dropout_kw = dict(deterministic=deterministic, rngs=rngs)
    session_idx_B = jnp.asarray(session_idx_B, jnp.int32)
    if self.compat == "original":  # one eid per call: trial 0's
      session_idx_B = jnp.broadcast_to(session_idx_B[0], (B,))
    n_B = jnp.asarray(self.session_neurons, jnp.int32)[session_idx_B]
    neuron_mask_BxN = jnp.arange(N)[None, :] < n_B[:, None]
    time_mask_BxT = jnp.asarray(time_mask_BxT, bool)

    patches_BxKxC, key_real_BxK = self.patch(spikes_BxTxN, time_mask_BxT, neuron_mask_BxN)
    x_BxKxH = self._embed_patches(patches_BxKxC, T)
    if self.embed_region is not None:
      region_BxS = jnp.asarray(self.patch_regions, jnp.int32)[session_idx_B]
      region_BxSxH = self.region_norm(self.embed_region(region_BxS).astype(jnp.float32))
      x_BxKxH = x_BxKxH + jnp.tile(region_BxSxH, (1, x_BxKxH.shape[1] // self.num_space, 1))  # time-major tokens
    x_BxKxH = self.embed_dropout(x_BxKxH, **dropout_kw)
    order_BxK = None
    if self.compat == "none":  # the encoder sees a trial's real tokens first (see `real_first`)
      order_BxK, inverse_BxK = real_first(key_real_BxK)
      x_BxKxH = _permute_tokens(x_BxKxH, order_BxK, inverse_BxK)
    x_BxLxH = self._prepend_prefix(x_BxKxH, session_idx_B, prompt_idx)
    mask_BxLxL = self.attention_mask(key_real_BxK, causal, order_BxK)
    for layer in self.layers:
      x_BxLxH = layer(x_BxLxH, mask_BxLxL, None, **dropout_kw)
    x_BxKxH = self.out_norm(x_BxLxH)[:, self.num_prefix:]
    if order_BxK is not None:
      x_BxKxH = _permute_tokens(x_BxKxH, inverse_BxK, order_BxK)
    return x_BxKxH, key_real_BxK

  def _grid(self, T: int) -> tuple[int, int]:
    return -(-T // self.patch_bins), self.num_space

  def patch(self, spikes_BxTxN, time_mask_BxT, neuron_mask_BxN) -> tuple[jax.Array, jax.Array]:
    """Tokens [B, K, C] (K = Tp·S, time-major) and whether each token is a real key [B, K]."""
    B, T, N = spikes_BxTxN.shape
    Tp, S = self._grid(T)
    F, Ft = self.patch_neurons, self.patch_bins
    if self.compat == "original":
      # The original reads its input as given; its loader writes -1 into padded neurons (ours: 0) and bins.
      fill, real_BxTxN = PAD_VALUE, jnp.broadcast_to(neuron_mask_BxN[:, None, :], spikes_BxTxN.shape)
    else:
      fill, real_BxTxN = 0.0, time_mask_BxT[:, :, None] & neuron_mask_BxN[:, None, :]
    x_BxTxN = jnp.where(real_BxTxN, spikes_BxTxN.astype(jnp.float32), fill)
    pad = ((0, 0), (0, Tp * Ft - T), (0, S * F - N))
    x_BxTxN = jnp.pad(x_BxTxN, pad, constant_values=fill)
    time_real_BxT = jnp.pad(time_mask_BxT, pad[:2])
    neuron_real_BxN = jnp.pad(neuron_mask_BxN, (pad[0], pad[2]))
    if self.compat == "original":
      x_BxTxN = x_BxTxN[:, :, _original_fill_index(jnp.sum(neuron_mask_BxN[0]), S * F, F)]
      # Patch masks OR-ed over the batch, then shared by every trial.
      time_real_BxT = jnp.broadcast_to(time_real_BxT.any(0), time_real_BxT.shape)
      neuron_real_BxN = jnp.broadcast_to(neuron_real_BxN.any(0), neuron_real_BxN.shape)
    time_real_BxTp = time_real_BxT.reshape(B, Tp, Ft).any(-1)
    space_real_BxS = neuron_real_BxN.reshape(B, S, F).any(-1)
    key_real_BxK = (time_real_BxTp[:, :, None] & space_real_BxS[:, None, :]).reshape(B, Tp * S)
    patches = x_BxTxN.reshape(B, Tp, Ft, S, F).transpose(0, 1, 3, 2, 4).reshape(B, Tp * S, Ft * F)
    return patches, key_real_BxK

  def _unpatch(self, y_BxKxC, T: int, N: int) -> jax.Array:
    B = y_BxKxC.shape[0]
    Tp, S = self._grid(T)
    F, Ft = self.patch_neurons, self.patch_bins
    y = y_BxKxC.reshape(B, Tp, S, Ft, F).transpose(0, 1, 3, 2, 4).reshape(B, Tp * Ft, S * F)
    return y[:, :T, :N]

  def _embed_patches(self, patches_BxKxC, T: int) -> jax.Array:
    """Token embedding [B, K, H] in float32 (the residual stream's dtype), with space and time positions."""
    Tp, S = self._grid(T)
    x = _EMBED_ACTS[self.embed_act](self.embed_spikes(patches_BxKxC)) * self.embed_scale
    x_BxKxH = self.projection(x).astype(jnp.float32)
    space_SxH = self.space_pos_norm(self.embed_space_pos.embedding[...][:S])
    time_TpxH = self.time_pos_norm(self.embed_time_pos.embedding[...][:Tp])
    pos_KxH = (time_TpxH[:, None, :] + space_SxH[None, :, :]).reshape(Tp * S, -1)
    return x_BxKxH + pos_KxH[None].astype(jnp.float32)

  def _prepend_prefix(self, x_BxKxH, session_idx_B, prompt_idx) -> jax.Array:
    """Token order: session token, prompt token, then the patches."""
    B = x_BxKxH.shape[0]
    tokens = []
    if self.embed_session is not None:
      tokens.append(self.embed_session(session_idx_B))
    if self.embed_prompt is not None:
      tokens.append(self.embed_prompt(jnp.broadcast_to(jnp.asarray(prompt_idx, jnp.int32), (B,))))
    return jnp.concatenate([*(t[:, None, :].astype(jnp.float32) for t in tokens), x_BxKxH], axis=1)

  def attention_mask(self, key_real_BxK, causal, order_BxK=None) -> jax.Array:
    """Boolean [B, L, L]: I OR (context AND key is real); `causal` may be traced (both contexts are built).

    compat "none": tokens in the encoder's order `order_BxK` (`real_first`; default the time-major grid), and a
    padded token sees only itself (its output is never read: as a key it is masked, its neurons or bins are
    outside every loss and metric). compat "original": the original's mask, padded queries see the real keys.
    """
    B, K = key_real_BxK.shape
    P, S = self.num_prefix, self.num_space
    L = P + K
    i_Lx1, j_1xL = jnp.arange(L)[:, None], jnp.arange(L)[None, :]
    if self.compat == "original":
      key_real_BxL = jnp.concatenate([jnp.ones((B, P), bool), key_real_BxK], axis=1)
      # The original tiles tril(ones(Tp, Tp)) over the token grid: row k, column k' -> k' mod Tp <= k mod Tp.
      Tp = K // S
      k_i, k_j = (i_Lx1 - P) % Tp, (j_1xL - P) % Tp
      causal_LxL = (i_Lx1 < P) | (j_1xL < P) | (k_j <= k_i)
      context_LxL = jnp.where(causal, causal_LxL, True)
      return (i_Lx1 == j_1xL)[None] | (context_LxL[None] & key_real_BxL[:, None, :])
    if order_BxK is None:
      order_BxK = jnp.broadcast_to(jnp.arange(K), (B, K))
    real_BxL = jnp.concatenate([jnp.ones((B, P), bool), jnp.take_along_axis(key_real_BxK, order_BxK, 1)], axis=1)
    time_BxL = jnp.concatenate([jnp.full((B, P), -1), order_BxK // S], axis=1)  # the prefix precedes every bin
    causal_BxLxL = time_BxL[:, None, :] <= time_BxL[:, :, None]
    context_BxLxL = jnp.where(causal, causal_BxLxL, True)
    return (i_Lx1 == j_1xL)[None] | (context_BxLxL & real_BxL[:, None, :] & real_BxL[:, :, None])


def real_first(key_real_BxK: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The encoder's token order [B, K] per trial: real tokens first, then padding, each in time-major order; and
  its inverse. Attention is the same function of its tokens in any order (positions are in the embeddings), but
  with the real keys first every query's keys end at its last real (in the causal scheme: its latest visible)
  one, where the CPU attention kernel stops reading (docs/performance.md, row 41)."""
  order_BxK = jnp.argsort(~key_real_BxK, axis=1, stable=True)
  return order_BxK, jnp.argsort(order_BxK, axis=1)


@jax.custom_vjp
def _permute_tokens(x_BxKxH, order_BxK, inverse_BxK):
  """x[b, order[b, k]]; the gradient is the inverse permutation's gather (not the scatter-add JAX would take)."""
  return jnp.take_along_axis(x_BxKxH, order_BxK[:, :, None], axis=1)


def _permute_fwd(x_BxKxH, order_BxK, inverse_BxK):
  return _permute_tokens(x_BxKxH, order_BxK, inverse_BxK), (order_BxK, inverse_BxK)


def _permute_bwd(residuals, g_BxKxH):
  order_BxK, inverse_BxK = residuals
  return _permute_tokens(g_BxKxH, inverse_BxK, order_BxK), None, None


_permute_tokens.defvjp(_permute_fwd, _permute_bwd)


def patch_regions(session_regions, num_space: int, F: int) -> tuple[tuple[int, ...], ...]:
  """[S][num_space]: the most frequent region id among each space patch's real neurons (the smallest id on a
  tie, as `torch.mode`); 0 for a patch of padding only (a masked key, never read)."""
  table = []
  for ids in session_regions:
    ids = np.asarray(ids, np.int64)
    row = []
    for j in range(num_space):
      chunk = ids[j * F:(j + 1) * F]
      row.append(int(np.argmax(np.bincount(chunk))) if len(chunk) else 0)
    table.append(tuple(row))
  return tuple(table)


def _original_fill_index(n, width: int, F: int) -> jax.Array:
  """Column sources of the original's partial patch: with q, r = divmod(n, F) and r > 0, slots n..(q+1)F-1 of
  patch q copy columns c - F (the previous patch's last neurons; index -1 wraps to the last patch, as there)."""
  c = jnp.arange(width)
  q, r = n // F, n % F
  fill = (r != 0) & (c >= n) & (c < (q + 1) * F)
  return jnp.where(fill, (c - F) % width, c)


Model = NDT2

# --- the model-family contract (ibl_jax/models/__init__.py) ----------------------------------------------

ARCHITECTURE = ("patch_neurons", "patch_bins", "max_neurons", "max_bins", "embed_mult", "embed_act", "hidden_size",
                "num_layers", "num_heads", "mlp_size", "norm", "use_prompt", "use_session", "num_prompts",
                "embed_region", "num_regions")
SESSION_PARAMS = ("embed_session",)  # no stitching: only the session token is per session
LOG_RATE_BIAS = ("decoder", "bias")  # [C], shared: training.init_log_rate_bias starts it at the corpus's log mean count


def default_config(size: str = "small") -> config_dict.ConfigDict:
  """The `model` section: "small" trains on a 2-core CPU in minutes; "paper": the MtM paper's NDT2 sizes."""
  if size not in ("small", "paper"):
    raise UserError(f"model size {size!r}: use small or paper")
  paper = size == "paper"
  m = config_dict.ConfigDict()
  m.name = "ndt2"
  # Small: 64 neurons per patch keeps the synthetic corpus (N <= 160) at 3 x 100 = 300 tokens, CPU-trainable
  # (32 gave 500 tokens, about 2.5x slower a step).
  m.patch_neurons = 128 if paper else 64  # neurons per patch (the original's max_space_F)
  m.patch_bins = 1  # bins per patch (max_time_F); 1 keeps the causal scheme strictly causal per bin
  m.max_neurons = 1024 if paper else 256  # rows of the space-position table = ceil(max_neurons / patch_neurons)
  m.max_bins = 100  # rows of the time-position table = ceil(max_bins / patch_bins)
  m.embed_mult = 2  # embed Linear(C -> embed_mult * C), C = patch_neurons * patch_bins
  m.embed_act = "softsign"  # softsign | identity
  m.embed_scale = 1.0
  m.hidden_size = 512 if paper else 64
  m.num_layers = 5 if paper else 2
  m.num_heads = 8 if paper else 4
  m.mlp_size = 1024 if paper else 128
  m.embed_dropout = 0.2 if paper else 0.0  # the small CPU model learns faster without (as NDT1's)
  m.dropout = 0.4 if paper else 0.0
  m.attention_dropout = 0.4 if paper else 0.0
  m.position = "learned"  # learned space and time embeddings (each through its own norm), as the original
  m.norm = "layernorm"  # layernorm | scalenorm
  m.norm_eps = 1e-5
  m.gelu_approximate = False
  m.use_prompt = True
  m.use_session = True
  m.num_prompts = 4
  m.embed_region = False  # add each space patch's majority-region embedding (the original offers it, never used)
  m.num_regions = 256  # rows of the region table (region ids of the corpus vocabulary must be below it)
  m.compat = "none"  # none | original (the original STPatch's quirks, for imported checkpoints)
  # Attention on GPUs without probability dropout: xla (JAX's default) | cudnn (fused; bfloat16 only).
  m.attention_impl = "xla"
  m.dtype = "float32"
  return m


def _tokens(cfg, T: int, n_max: int) -> int:
  S = math.ceil((cfg.max_neurons if cfg.compat == "original" else n_max) / cfg.patch_neurons)
  return math.ceil(T / cfg.patch_bins) * S


def flops_per_trial(cfg: ml_collections.ConfigDict, T: int, n_max: int) -> int:
  """Forward matmul FLOPs of one trial (2·m·n·k per product): with K patch tokens, C = patch_neurons·patch_bins,
  E = embed_mult·C, L = K + prefix: 2K(C·E + E·H) + layers·(8·L·H² + 4·L²·H + 4·L·H·M) + 2·K·H·C."""
  K, H, M = _tokens(cfg, T, n_max), cfg.hidden_size, cfg.mlp_size
  C = cfg.patch_neurons * cfg.patch_bins
  E = cfg.embed_mult * C
  L = K + int(cfg.use_session) + int(cfg.use_prompt)
  per_layer = 8 * L * H * H + 4 * L * L * H + 4 * L * H * M
  return int(2 * K * (C * E + E * H) + cfg.num_layers * per_layer + 2 * K * H * C)


def activation_bytes_per_row(cfg: ml_collections.ConfigDict, T: int, n_max: int) -> int:
  """float32: inputs, predictions and accumulator (3·T·n_max), patches and decoder output (2·K·C), one layer's
  activations (6·L·H + 2·L·mlp) and attention logits and probabilities (2·heads·L²)."""
  K = _tokens(cfg, T, n_max)
  L, H = K + int(cfg.use_session) + int(cfg.use_prompt), cfg.hidden_size
  C = cfg.patch_neurons * cfg.patch_bins
  return 4 * (3 * T * n_max + 2 * K * C + 6 * L * H + 2 * L * cfg.mlp_size + 2 * cfg.num_heads * L * L)


# --- the original PyTorch STPatch: one name table for import and export -----------------------------------

# The original pickles `encoder.context_mask` (a [T², T²] tensor) as a plain attribute; should it ever be a
# buffer, it is not a parameter. Region embeddings are off in every original NDT2 config.
TORCH_IGNORED = ("encoder.context_mask",)
OUR_PROMPT_IDX = {name: masking.PROMPT_IDX[i] for i, name in enumerate(masking.MTM_SCHEMES)}
TORCH_ATTRS = {"patch_neurons": "encoder.embedder.max_space_F", "patch_bins": "encoder.embedder.max_time_F",
               "embed_region": "encoder.embed_region"}  # read from a pickled STPatch (convert.py)


def torch_names(cfg: ml_collections.ConfigDict, sessions: Sequence[TorchSession]) -> list[Name]:
  e = "encoder.embedder"
  names = [*tn.linear(("embed_spikes",), f"{e}.embed_spikes"), *tn.linear(("projection",), f"{e}.projection"),
           Name(("embed_space_pos", "embedding"), f"{e}.embed_space_pos.0.weight"),
           *tn.norm(cfg, ("space_pos_norm",), f"{e}.embed_space_pos.1"),
           Name(("embed_time_pos", "embedding"), f"{e}.embed_time_pos.0.weight"),
           *tn.norm(cfg, ("time_pos_norm",), f"{e}.embed_time_pos.1")]
  if cfg.use_prompt:
    names.append(Name(("embed_prompt", "embedding"), f"{e}.embed_prompt.weight"))
  if cfg.use_session:
    names.append(Name(("embed_session", "embedding"), f"{e}.embed_session.weight",
                      rows=tuple(s.row for s in sessions)))
  return names + tn.encoder_layers(cfg) + tn.linear(("decoder",), "decoder.0")


def params_from_torch(state_dict: dict[str, np.ndarray], cfg: ml_collections.ConfigDict,
                      sessions: Sequence[TorchSession], n_max: int | None = None) -> nnx.State:
  """An nnx.State of Params for `NDT2(cfg, num_sessions=len(sessions), ...)` (load with `nnx.update`)."""
  n_max = n_max or max(s.num_neurons for s in sessions)
  abstract = nnx.state(nnx.eval_shape(lambda: NDT2(cfg, num_sessions=len(sessions), n_max=n_max,
                                                   rngs=nnx.Rngs(0))), nnx.Param)
  return tn.import_params(state_dict, torch_names(cfg, sessions), abstract, TORCH_IGNORED, "NDT2")


def params_to_torch(params, cfg: ml_collections.ConfigDict, sessions: Sequence[TorchSession]
                    ) -> dict[str, np.ndarray]:
  """Our params as an original STPatch state dict, the inverse of `params_from_torch`."""
  return tn.export_params(params, torch_names(cfg, sessions))


def is_torch_checkpoint(state_dict) -> bool:
  return "encoder.embedder.embed_space_pos.0.weight" in state_dict


def config_from_torch(ckpt: TorchCheckpoint, *, num_heads: int | None = None,
                      log: Callable[[str], None] = print) -> ml_collections.ConfigDict:
  """Our `model` config (compat "original") for an STPatch checkpoint: sizes from shapes, the rest pickled."""
  sd, attrs = ckpt.state_dict, ckpt.attrs
  e = "encoder.embedder"
  required = [f"{e}.embed_spikes.weight", f"{e}.projection.weight", f"{e}.embed_time_pos.0.weight",
              "encoder.layers.0.mlp.up_proj.weight", "decoder.0.weight"]
  missing = [name for name in required if name not in sd]
  if missing:
    raise ConvertError(f"not an NDT2 (STPatch) state dict: no {', '.join(missing)} (has {len(sd)} tensors)")
  if attrs.get("embed_region") or any(k.startswith(f"{e}.embed_region") for k in sd):
    raise ConvertError("the checkpoint embeds brain regions (embed_region=true): not supported")
  embed_out, C = sd[f"{e}.embed_spikes.weight"].shape
  Ft = int(attrs.get("patch_bins") or 1)
  F = int(attrs.get("patch_neurons") or C // Ft)
  if F * Ft != C or embed_out % C:
    raise ConvertError(f"embed_spikes maps {C} -> {embed_out}: not {F} neurons x {Ft} bins times a whole multiple")
  if Ft != 1:
    raise ConvertError(f"max_time_F={Ft}: the original un-patches patches of several bins wrongly; only 1 is supported")
  layer_ids = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
  if layer_ids != list(range(len(layer_ids))):
    raise ConvertError(f"encoder layers {layer_ids} are not numbered 0..L-1")
  cfg = default_config("small")
  cfg.update(patch_neurons=F, patch_bins=Ft, embed_mult=int(embed_out // C),
             max_neurons=int(sd[f"{e}.embed_space_pos.0.weight"].shape[0]) * F,
             max_bins=int(sd[f"{e}.embed_time_pos.0.weight"].shape[0]) * Ft,
             hidden_size=int(sd[f"{e}.projection.weight"].shape[0]), num_layers=len(layer_ids),
             mlp_size=int(sd["encoder.layers.0.mlp.up_proj.weight"].shape[0]),
             use_prompt=f"{e}.embed_prompt.weight" in sd, use_session=f"{e}.embed_session.weight" in sd,
             norm="scalenorm" if "encoder.out_norm.scale" in sd else "layernorm", compat="original",
             dtype="float32", gelu_approximate=False, norm_eps=1e-5)
  if cfg.use_prompt:
    cfg.num_prompts = int(sd[f"{e}.embed_prompt.weight"].shape[0])
  cfg.num_heads = tn.num_heads(attrs, num_heads, log, " (the mtm_ndt2_small fixture has 4)")
  if cfg.hidden_size % cfg.num_heads:
    raise ConvertError(f"hidden size {cfg.hidden_size} is not divisible by {cfg.num_heads} heads")
  tn.apply_pickled_attrs(cfg, attrs, OUR_PROMPT_IDX)
  return cfg


def torch_sessions(ckpt: TorchCheckpoint, eids: Sequence[str] | None, num_neurons: Sequence[int] | None,
                   log: Callable[[str], None] = print) -> list[TorchSession]:
  """STPatch stores neither which eids it was trained on in order nor their neuron counts: both are required."""
  if not eids or not num_neurons:
    raise ConvertError("an NDT2 (STPatch) checkpoint does not store its sessions' neuron counts: pass --eids and "
                       "--num-neurons, one N per eid")
  if len(eids) != len(num_neurons):
    raise ConvertError(f"{len(eids)} eids but {len(num_neurons)} --num-neurons")
  if len(set(eids)) != len(eids):
    raise ConvertError(f"--eids repeats an eid: {','.join(eids)}")
  rows = tn.session_rows(tn.eid_rows(ckpt.attrs), eids, log)
  return [TorchSession(eid, int(n), rows[eid]) for eid, n in zip(eids, num_neurons)]
