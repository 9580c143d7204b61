"""NDT1 with multi-task-masking prompts (Zhang et al. 2024), docs/design.md §5.

  spikes [B, T, N_max]
    -> stitch-in[session] (N_max -> C) -> Linear(C -> embed_mult*C) -> act * embed_scale -> Linear(-> H)
    -> + learned position embedding (bin index) -> embed dropout
    -> [session token, prompt token, bins]       (prefix tokens: no position embedding)
    -> num_layers pre-norm encoder layers -> final norm -> drop the prefix
    -> stitch-out[session] (H -> N_max) -> log-rates [B, T, N_max], float32

`causal` and `prompt_idx` are traced values, so one compiled function serves every masking scheme.
"""

import ml_collections
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import traverse_util

from ibl_jax.models import layers
from ibl_jax.models.stitching import SessionLinear
from ibl_jax.errors import UserError

_EMBED_ACTS = {"softsign": jax.nn.soft_sign, "identity": lambda x: x}


def attention_mask(
    time_mask_BxT: jax.Array, num_prefix: int, causal: jax.Array | bool, causal_prefix: str
) -> jax.Array:
  """Boolean [B, L, L] mask (True: query i may attend key j) over L = num_prefix + T tokens.

  mask = I OR (context AND key_is_real): every token sees itself, so no softmax row is empty even at a
  padded query; no token sees a padded bin. Context is all-ones unless `causal`, then:
    strict:   prefix tokens see only the prefix; bin t sees the prefix and bins <= t.
    original: as the original NDT1, prefix tokens see every bin and every bin sees the prefix, so later
              bins leak into earlier ones through the prefix after two layers.
  `causal` may be traced: both contexts are built and selected with jnp.where, so it never recompiles.
  """
  B, T = time_mask_BxT.shape
  L = num_prefix + T
  key_real_BxL = jnp.concatenate(
      [jnp.ones((B, num_prefix), bool), time_mask_BxT.astype(bool)], axis=1
  )
  i_Lx1 = jnp.arange(L)[:, None]
  j_1xL = jnp.arange(L)[None, :]
  causal_LxL = (j_1xL < num_prefix) | (j_1xL <= i_Lx1)
  if causal_prefix == "original":
    causal_LxL = causal_LxL | (i_Lx1 < num_prefix)
  elif causal_prefix != "strict":
    raise UserError(f"model.causal_prefix must be 'strict' or 'original', got {causal_prefix!r}")
  context_LxL = jnp.where(causal, causal_LxL, True)
  return (i_Lx1 == j_1xL)[None] | (context_LxL[None] & key_real_BxL[:, None, :])


class NDT1(nnx.Module):
  """The MtM NDT1 encoder with per-session stitching; returns float32 log-rates.

  Param tree (S = num_sessions, or 1 when cfg.stitching is False):
    stitch_in/{kernel [S, N_max, C], bias [S, C]}, embed_spikes, projection, embed_pos/embedding
    [max_bins, H], embed_session/embedding [num_sessions, H], embed_prompt/embedding [num_prompts, H],
    layers/{l}/{ln1, attn/{query,key,value,out_proj}, ln2, mlp/{up_proj,down_proj}}, out_norm,
    stitch_out/{kernel [S, H, N_max], bias [S, N_max]}.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, num_sessions: int, n_max: int, rngs: nnx.Rngs):
    if cfg.embed_act not in _EMBED_ACTS:
      raise UserError(f"model.embed_act must be one of {sorted(_EMBED_ACTS)}, got {cfg.embed_act!r}")
    if cfg.position not in ("learned", "rope"):
      raise UserError(f"model.position must be 'learned' or 'rope', got {cfg.position!r}")
    if cfg.causal_prefix not in ("strict", "original"):
      raise UserError(f"model.causal_prefix must be 'strict' or 'original', got {cfg.causal_prefix!r}")
    dtype = layers.compute_dtype(cfg.dtype)
    C, H = cfg.n_channels, cfg.hidden_size
    E = cfg.embed_mult * C

    # Plain hashable attributes only: they become part of the static graphdef.
    self.num_sessions = num_sessions
    self.n_max = n_max
    self.stitching = bool(cfg.stitching)
    self.embed_act = cfg.embed_act
    self.embed_scale = float(cfg.embed_scale)
    self.position = cfg.position
    self.max_bins = cfg.max_bins
    self.causal_prefix = cfg.causal_prefix
    self.dropout_rates = (cfg.embed_dropout, cfg.dropout, cfg.attention_dropout)
    self.num_prefix = int(cfg.use_session) + int(cfg.use_prompt)

    num_stitch = num_sessions if cfg.stitching else 1
    self.stitch_in = SessionLinear(num_stitch, n_max, C, dtype=dtype, rngs=rngs)
    self.embed_spikes = nnx.Linear(C, E, dtype=dtype, rngs=rngs)
    self.projection = nnx.Linear(E, H, dtype=dtype, rngs=rngs)
    self.embed_pos = nnx.Embed(cfg.max_bins, H, rngs=rngs) if cfg.position == "learned" else None
    self.embed_dropout = nnx.Dropout(cfg.embed_dropout)
    self.embed_session = nnx.Embed(num_sessions, H, rngs=rngs) if cfg.use_session else None
    self.embed_prompt = nnx.Embed(cfg.num_prompts, H, rngs=rngs) if cfg.use_prompt else None
    self.layers = nnx.List([layers.EncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
    self.out_norm = layers.make_norm(cfg, H, dtype, rngs)
    self.stitch_out = SessionLinear(num_stitch, H, n_max, dtype=dtype, rngs=rngs)

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
    """Returns log-rates [B, T, N_max] in float32.

    Args:
      spikes_BxTxN: (masked) counts, zero at padded neurons.
      time_mask_BxT: True at real bins; padded bins are never attended to.
      session_idx_B: int session index of each trial (stitch rows and session token).
      prompt_idx: int32 scalar or [B]: the masking scheme (neuron=0, causal=1, inter=2, intra=3).
      causal: bool scalar, may be traced.
      deterministic: True disables every dropout.
      rngs: holds the 'dropout' stream; required when deterministic is False.
    """
    B, T, N = spikes_BxTxN.shape
    if N != self.n_max:
      raise UserError(f"spikes have {N} neurons, the model was built for n_max={self.n_max}")
    if self.position == "learned" and T > self.max_bins:
      raise UserError(f"{T} time bins exceed model.max_bins={self.max_bins}")
    if not deterministic and rngs is None and any(self.dropout_rates):
      raise ValueError("deterministic=False needs `rngs` with a 'dropout' stream")
    dropout_kw = dict(deterministic=deterministic, rngs=rngs)
    session_idx_B = jnp.asarray(session_idx_B, jnp.int32)
    stitch_idx_B = session_idx_B if self.stitching else jnp.zeros_like(session_idx_B)

    x_BxTxH = self._embed_bins(spikes_BxTxN, stitch_idx_B)
    x_BxTxH = self.embed_dropout(x_BxTxH, **dropout_kw)
    x_BxLxH = self._prepend_prefix(x_BxTxH, session_idx_B, prompt_idx)

    mask_BxLxL = attention_mask(time_mask_BxT, self.num_prefix, causal, self.causal_prefix)
    positions_L = jnp.arange(x_BxLxH.shape[1]) if self.position == "rope" else None
    for layer in self.layers:
      x_BxLxH = layer(x_BxLxH, mask_BxLxL, positions_L, **dropout_kw)
    x_BxLxH = self.out_norm(x_BxLxH)

    x_BxTxH = x_BxLxH[:, self.num_prefix :]
    return self.stitch_out(x_BxTxH, stitch_idx_B).astype(jnp.float32)

  def _embed_bins(self, spikes_BxTxN: jax.Array, stitch_idx_B: jax.Array) -> jax.Array:
    """Per-bin token embedding [B, T, H], float32 (the residual stream's dtype)."""
    x_BxTxC = self.stitch_in(spikes_BxTxN, stitch_idx_B)
    x_BxTxE = _EMBED_ACTS[self.embed_act](self.embed_spikes(x_BxTxC)) * self.embed_scale
    x_BxTxH = self.projection(x_BxTxE).astype(jnp.float32)
    if self.embed_pos is not None:
      T = spikes_BxTxN.shape[1]
      x_BxTxH = x_BxTxH + self.embed_pos.embedding[...][:T][None]
    return x_BxTxH

  def _prepend_prefix(self, x_BxTxH: jax.Array, session_idx_B: jax.Array, prompt_idx) -> jax.Array:
    """Token order: session token, prompt token, then the bins."""
    B = x_BxTxH.shape[0]
    tokens = []
    if self.embed_session is not None:
      tokens.append(self.embed_session(session_idx_B))
    if self.embed_prompt is not None:
      prompt_idx_B = jnp.broadcast_to(jnp.asarray(prompt_idx, jnp.int32), (B,))
      tokens.append(self.embed_prompt(prompt_idx_B))
    prefix_BxPxH = [t[:, None, :].astype(jnp.float32) for t in tokens]
    return jnp.concatenate([*prefix_BxPxH, x_BxTxH], axis=1)


def flops_per_trial(cfg: ml_collections.ConfigDict, T: int, n_max: int) -> int:
  """Forward matmul FLOPs for one trial, counting 2*m*n*k per [m, k] @ [k, n] product.

  With N = n_max, C = n_channels, E = embed_mult*C, H = hidden_size, M = mlp_size, P prefix tokens and
  L = T + P:
    2*T*(N*C + C*E + E*H)                          stitch-in, embed, projection
    + num_layers * (4 * 2*L*H*H                    q, k, v, out projections
                    + 2 * 2*L*L*H                  q k^T and probs v
                    + 2 * 2*L*H*M)                 MLP up and down
    + 2*T*H*N                                      stitch-out
  Norms, softmax and element-wise ops are ignored. A training step costs about 3x this (backward ~2x).
  """
  N, C, H, M = n_max, cfg.n_channels, cfg.hidden_size, cfg.mlp_size
  E = cfg.embed_mult * C
  L = T + int(cfg.use_session) + int(cfg.use_prompt)
  embed = 2 * T * (N * C + C * E + E * H)
  per_layer = 4 * 2 * L * H * H + 2 * 2 * L * L * H + 2 * 2 * L * H * M
  return int(embed + cfg.num_layers * per_layer + 2 * T * H * N)


def param_count(params) -> int:
  """Number of scalars in a params pytree (an nnx.State, a pure dict, or abstract shapes)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# --- import of original PyTorch checkpoints --------------------------------------------------------------

# `decoder.0.*` is the ssl head Linear(H -> n_channels) of the original; with stitching the forward pass
# uses `stitch_decoder` instead, so it is never used.
_IGNORED_PREFIXES = ("decoder.",)


def params_from_torch_state_dict(
    state_dict: dict[str, np.ndarray],
    cfg: ml_collections.ConfigDict,
    session_keys: list[str],
    session_rows: list[int],
    *,
    n_max: int | None = None,
) -> nnx.State:
  """Maps an original NDT1 `state_dict` (as numpy arrays) onto this model's params.

  torch Linear `weight` is [out, in], so a kernel is `weight.T`. The original keys its stitchers by neuron
  count; session i here takes `stitcher_dict.{session_keys[i]}` and `stitch_decoder_dict.{session_keys[i]}`,
  zero-padded to n_max, and row `session_rows[i]` of `embed_session`. Ignored: `decoder.0.*` (unused head).

  Args:
    state_dict: name -> array, e.g. `dict(np.load('state_dict.npz'))`.
    cfg: the model config the checkpoint was trained with (the `model` ConfigDict).
    session_keys: the original stitcher key (str(N_s)) of each of our sessions, in our session order.
    session_rows: the original session-token row (the eid's index) of each of our sessions.
    n_max: padded neuron count; defaults to the largest N_s among the chosen sessions.

  Returns:
    An nnx.State of Params for `NDT1(cfg, num_sessions=len(session_keys), n_max=n_max, ...)`; load it
    with `nnx.update(model, state)`.

  Raises:
    ValueError: listing every missing, unmapped or misshaped tensor, or a config the checkpoint cannot fit.
  """
  if len(session_rows) != len(session_keys):
    raise UserError(f"{len(session_keys)} session_keys but {len(session_rows)} session_rows")
  if not cfg.stitching and len(session_keys) != 1:
    raise UserError("cfg.stitching=False has one shared stitch layer: pass exactly one session key")
  sd = {name: np.asarray(value, np.float32) for name, value in state_dict.items()}
  problems: list[str] = []
  used: set[str] = set()

  def take(name: str) -> np.ndarray | None:
    if name not in sd:
      problems.append(f"missing {name}")
      return None
    used.add(name)
    return sd[name]

  flat: dict[tuple, np.ndarray | None] = {}

  def linear(ours: tuple, theirs: str):
    w = take(f"{theirs}.weight")
    flat[(*ours, "kernel")] = None if w is None else w.T
    flat[(*ours, "bias")] = take(f"{theirs}.bias")

  def norm(ours: tuple, theirs: str):
    if cfg.norm == "layernorm":
      flat[(*ours, "scale")] = take(f"{theirs}.weight")
      flat[(*ours, "bias")] = take(f"{theirs}.bias")
    else:
      flat[(*ours, "scale")] = take(f"{theirs}.scale")

  linear(("embed_spikes",), "encoder.embedder.embed_spikes")
  linear(("projection",), "encoder.embedder.projection")
  if cfg.position == "learned":
    flat[("embed_pos", "embedding")] = take("encoder.embedder.embed_pos.weight")
  if cfg.use_prompt:
    flat[("embed_prompt", "embedding")] = take("encoder.embedder.embed_prompt.weight")
  if cfg.use_session:
    table = take("encoder.embedder.embed_session.weight")
    if table is not None and max(session_rows) >= table.shape[0]:
      problems.append(f"session_rows {session_rows} out of range for embed_session {table.shape}")
      table = None
    flat[("embed_session", "embedding")] = None if table is None else table[np.asarray(session_rows)]
  for l in range(cfg.num_layers):
    prefix = f"encoder.layers.{l}"
    norm(("layers", l, "ln1"), f"{prefix}.ln1")
    for name in ("query", "key", "value", "out_proj"):
      linear(("layers", l, "attn", name), f"{prefix}.attn.{name}")
    norm(("layers", l, "ln2"), f"{prefix}.ln2")
    linear(("layers", l, "mlp", "up_proj"), f"{prefix}.mlp.up_proj")
    linear(("layers", l, "mlp", "down_proj"), f"{prefix}.mlp.down_proj")
  norm(("out_norm",), "encoder.out_norm")

  stitch_in = [(take(f"encoder.stitcher.stitcher_dict.{k}.weight"),
                take(f"encoder.stitcher.stitcher_dict.{k}.bias")) for k in session_keys]
  stitch_out = [(take(f"stitch_decoder.stitch_decoder_dict.{k}.weight"),
                 take(f"stitch_decoder.stitch_decoder_dict.{k}.bias")) for k in session_keys]
  if n_max is None:
    n_max = max((w.shape[1] for w, _ in stitch_in if w is not None), default=0)
  flat.update(_stack_stitch_rows("stitch_in", stitch_in, n_max, True, problems))
  flat.update(_stack_stitch_rows("stitch_out", stitch_out, n_max, False, problems))

  problems += [
      f"unmapped {name} {sd[name].shape}"
      for name in sd
      if name not in used and not name.startswith(_IGNORED_PREFIXES)
  ]

  abstract = nnx.state(
      nnx.eval_shape(lambda: NDT1(cfg, num_sessions=len(session_keys), n_max=n_max, rngs=nnx.Rngs(0))),
      nnx.Param,
  )
  target = traverse_util.flatten_dict(nnx.to_pure_dict(abstract))
  for path, spec in target.items():
    value = flat.get(path)
    if path not in flat:
      problems.append(f"no tensor for param {'/'.join(map(str, path))}")
    elif value is not None and value.shape != spec.shape:  # None: reported as missing already
      problems.append(f"param {'/'.join(map(str, path))}: got {value.shape}, model wants {spec.shape}")
  problems += [f"mapped to unknown param {'/'.join(map(str, p))}" for p in flat if p not in target]
  if problems:
    raise UserError("cannot map the torch state dict onto NDT1:\n  " + "\n  ".join(problems))

  pure = traverse_util.unflatten_dict({path: jnp.asarray(flat[path]) for path in target})
  nnx.replace_by_pure_dict(abstract, pure)
  return abstract


def _stack_stitch_rows(
    name: str, rows: list[tuple], n_max: int, is_input: bool, problems: list[str]
) -> dict[tuple, np.ndarray | None]:
  """Stacks per-session torch Linears into [S, in, out] kernels, zero-padding the neuron axis to n_max."""
  if any(w is None or b is None for w, b in rows):
    return {}  # already reported as missing
  kernels = [w.T for w, _ in rows]  # [in, out]
  neuron_axis = 0 if is_input else 1
  n_neurons = [k.shape[neuron_axis] for k in kernels]
  if max(n_neurons) > n_max:
    problems.append(f"{name}: a session has {max(n_neurons)} neurons > n_max={n_max}")
    return {}
  if len({k.shape[1 - neuron_axis] for k in kernels}) != 1:
    problems.append(f"{name}: sessions disagree on the feature width: {[k.shape for k in kernels]}")
    return {}
  width = kernels[0].shape[1 - neuron_axis]
  S = len(rows)
  if is_input:
    kernel = np.zeros((S, n_max, width), np.float32)
    bias = np.zeros((S, width), np.float32)
  else:
    kernel = np.zeros((S, width, n_max), np.float32)
    bias = np.zeros((S, n_max), np.float32)
  for i, (k, (_, b)) in enumerate(zip(kernels, rows)):
    if is_input:
      kernel[i, : k.shape[0]] = k
      bias[i] = b
    else:
      kernel[i, :, : k.shape[1]] = k
      bias[i, : b.shape[0]] = b
  return {(name, "kernel"): kernel, (name, "bias"): bias}
