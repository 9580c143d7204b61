"""NDT1 with multi-task-masking prompts (Zhang et al. 2024), docs/design.md §5.

  spikes [B, T, N_max]
    -> stitch-in[session] (N_max -> C) -> Linear(C -> embed_mult*C) -> act * embed_scale -> Linear(-> H)
    -> + learned position embedding (bin index) -> embed dropout
    -> [session token, prompt token, bins]       (prefix tokens: no position embedding)
    -> num_layers pre-norm encoder layers -> final norm -> drop the prefix
    -> stitch-out[session] (H -> N_max) -> log-rates [B, T, N_max], float32

`causal` and `prompt_idx` are traced values, so one compiled function serves every masking scheme.
"""

import re
from collections.abc import Callable, Sequence

import ml_collections
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import config_dict

from ibl_jax import fused_random
from ibl_jax import masking
from ibl_jax.models import layers
from ibl_jax.models import torch_names as tn
from ibl_jax.models.stitching import SessionLinear
from ibl_jax.models.torch_names import ConvertError, Name, TorchCheckpoint, TorchSession
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

  def __init__(self, cfg: ml_collections.ConfigDict, *, num_sessions: int, n_max: int,
               session_neurons: Sequence[int] | None = None, session_regions=None, rngs: nnx.Rngs):
    del session_neurons, session_regions  # padded neurons carry zeros into the stitcher; regions are not embedded
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
    self.embed_spikes = layers.linear(C, E, dtype=dtype, rngs=rngs)
    self.projection = layers.linear(E, H, dtype=dtype, rngs=rngs)
    self.embed_pos = nnx.Embed(cfg.max_bins, H, rngs=rngs) if cfg.position == "learned" else None
    self.embed_dropout = fused_random.Dropout(cfg.embed_dropout)
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
      prefix_BxTxE: jax.Array | None = None,
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
      prefix_BxTxE: `input_prefix` of the spikes, computed elsewhere (then only the spikes' shape is read).
    """
    hidden_BxTxH = self.encode(spikes_BxTxN, time_mask_BxT, session_idx_B, prompt_idx, causal,
                               deterministic=deterministic, rngs=rngs, prefix_BxTxE=prefix_BxTxE)
    return self.stitch_out(hidden_BxTxH, self._stitch_idx(session_idx_B)).astype(jnp.float32)

  def encode(
      self,
      spikes_BxTxN: jax.Array,
      time_mask_BxT: jax.Array,
      session_idx_B: jax.Array,
      prompt_idx: jax.Array | int,
      causal: jax.Array | bool,
      *,
      deterministic: bool = True,
      rngs: nnx.Rngs | None = None,
      prefix_BxTxE: jax.Array | None = None,
  ) -> jax.Array:
    """The encoder's output per bin, [B, T, H] float32 (after the final norm, prefix dropped); same args."""
    B, T, N = spikes_BxTxN.shape
    if N != self.n_max:
      raise UserError(f"spikes have {N} neurons, the model was built for n_max={self.n_max}")
    if self.position == "learned" and T > self.max_bins:
      raise UserError(f"{T} time bins exceed model.max_bins={self.max_bins}")
    if not deterministic and rngs is None and any(self.dropout_rates):
      raise ValueError("deterministic=False needs `rngs` with a 'dropout' stream")
    dropout_kw = dict(deterministic=deterministic, rngs=rngs)
    session_idx_B = jnp.asarray(session_idx_B, jnp.int32)

    if prefix_BxTxE is None:
      prefix_BxTxE = self.input_prefix(spikes_BxTxN, session_idx_B)
    x_BxTxH = self._embed_bins(prefix_BxTxE, T)
    x_BxTxH = self.embed_dropout(x_BxTxH, **dropout_kw)
    x_BxLxH = self._prepend_prefix(x_BxTxH, session_idx_B, prompt_idx)

    mask_BxLxL = attention_mask(time_mask_BxT, self.num_prefix, causal, self.causal_prefix)
    positions_L = jnp.arange(x_BxLxH.shape[1]) if self.position == "rope" else None
    for layer in self.layers:
      x_BxLxH = layer(x_BxLxH, mask_BxLxL, positions_L, **dropout_kw)
    x_BxLxH = self.out_norm(x_BxLxH)
    return x_BxLxH[:, self.num_prefix :].astype(jnp.float32)

  def _stitch_idx(self, session_idx_B: jax.Array) -> jax.Array:
    session_idx_B = jnp.asarray(session_idx_B, jnp.int32)
    return session_idx_B if self.stitching else jnp.zeros_like(session_idx_B)

  def input_prefix(self, spikes_BxTxN: jax.Array, session_idx_B: jax.Array) -> jax.Array:
    """The embedding's pre-activation [B, T, E]: embed_spikes(stitch_in(spikes)), everything before the first
    non-linearity, hence affine in the counts. Co-smoothing computes it once per trial and corrects it per
    held-out neuron with `neuron_prefix` (ibl_jax/evaluate/heldout.py), instead of once per forward."""
    return self.embed_spikes(self.stitch_in(spikes_BxTxN, self._stitch_idx(session_idx_B)))

  def neuron_prefix(self, session_idx: jax.Array) -> jax.Array:
    """[N_max, E] float32: how one count of neuron n at a bin moves that bin's `input_prefix` (session
    `session_idx`'s stitch-in row n through embed_spikes, no biases)."""
    stitch_NxC = self.stitch_in.kernel[...][self._stitch_idx(jnp.asarray(session_idx, jnp.int32)[None])[0]]
    return jnp.dot(stitch_NxC, self.embed_spikes.kernel[...], preferred_element_type=jnp.float32)

  def _embed_bins(self, prefix_BxTxE: jax.Array, T: int) -> jax.Array:
    """Per-bin token embedding [B, T, H] from `input_prefix`, float32 (the residual stream's dtype)."""
    x_BxTxE = _EMBED_ACTS[self.embed_act](prefix_BxTxE) * self.embed_scale
    x_BxTxH = self.projection(x_BxTxE).astype(jnp.float32)
    if self.embed_pos is not None:
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


Model = NDT1

# --- the model-family contract (ibl_jax/models/__init__.py) ----------------------------------------------

# Fields that fix parameter shapes: fine-tuning refuses to change them.
ARCHITECTURE = ("n_channels", "embed_mult", "embed_act", "hidden_size", "num_layers", "num_heads", "mlp_size",
                "position", "norm", "use_prompt", "use_session", "stitching", "max_bins", "num_prompts")
SESSION_PARAMS = ("stitch_in", "stitch_out", "embed_session")  # one row per session; everything else is shared
SPARSE_SESSION_ROWS = True  # session_idx_B only picks rows of SESSION_PARAMS (a train step passes its batch's rows)
LOG_RATE_BIAS = ("stitch_out", "bias")  # [S, N_max]: training.init_log_rate_bias starts it at log mean counts


def default_config(size: str = "small") -> config_dict.ConfigDict:
  """The `model` section: "small" trains on a 2-core CPU in minutes; "paper" is DESIGN.md §5's model."""
  if size not in ("small", "paper"):
    raise UserError(f"model size {size!r}: use small or paper")
  paper = size == "paper"
  m = config_dict.ConfigDict()
  m.name = "ndt1"
  m.n_channels = 668 if paper else 64  # stitch-in width (N_s -> n_channels)
  m.embed_mult = 2  # embed Linear(n_channels -> embed_mult * n_channels)
  m.embed_act = "softsign"  # softsign | identity
  m.embed_scale = 1.0
  m.hidden_size = 512 if paper else 64
  m.num_layers = 5 if paper else 2
  m.num_heads = 8 if paper else 4
  m.mlp_size = 1024 if paper else 128
  # The paper's dropouts (0.2 / 0.4 / 0.4) regularise a 5-layer model trained for days; on the small CPU model
  # and a few thousand steps they stall learning (co-smoothing 0.003 vs 0.079 bits/spike after 1500 steps).
  m.embed_dropout = 0.2 if paper else 0.0
  m.dropout = 0.4 if paper else 0.0  # residual dropout after attention and MLP
  m.attention_dropout = 0.4 if paper else 0.0  # dropout on the attention probabilities
  m.position = "learned"  # learned | rope
  m.norm = "layernorm"  # layernorm | scalenorm
  m.norm_eps = 1e-5
  m.gelu_approximate = False  # the paper uses exact (erf) GELU
  m.use_prompt = True  # prompt token telling the model which masking scheme it solves
  m.use_session = True  # session token
  m.stitching = True  # per-session input/output layers; False: one shared layer over N_max
  m.max_bins = 100  # rows of the learned position embedding
  m.num_prompts = 4  # neuron, causal, inter-region, intra-region
  m.causal_prefix = "strict"  # strict | original (original: prefix tokens see all bins in causal mode)
  # Attention on GPUs without probability dropout: xla (JAX's default) | cudnn (fused; bfloat16 only).
  m.attention_impl = "xla"
  m.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
  return m


def activation_bytes_per_row(cfg: ml_collections.ConfigDict, T: int, n_max: int) -> int:
  """Forward memory of one evaluated row, float32: the inputs, predictions and accumulator (3·T·n_max), one
  layer's activations (6·L·H + 2·L·mlp) and its attention logits and probabilities (2·heads·L²), L = T + prefix."""
  L, H = T + int(cfg.use_session) + int(cfg.use_prompt), cfg.hidden_size
  return 4 * (3 * T * n_max + 6 * L * H + 2 * L * cfg.mlp_size + 2 * cfg.num_heads * L * L)


def param_count(params) -> int:
  """Number of scalars in a params pytree (an nnx.State, a pure dict, or abstract shapes)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# --- the original PyTorch NDT1: one name table for import and export --------------------------------------

# `decoder.0.*` is the ssl head Linear(H -> n_channels) of the original; with stitching the forward pass
# uses `stitch_decoder` instead, so it is never used (exported as zeros so `load_state_dict(strict)` accepts it).
TORCH_IGNORED = ("decoder.",)
_STITCHER = re.compile(r"^encoder\.stitcher\.stitcher_dict\.([^.]+)\.weight$")
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")
OUR_PROMPT_IDX = {name: masking.PROMPT_IDX[i] for i, name in enumerate(masking.MTM_SCHEMES)}
TORCH_ATTRS = {"use_rope": "encoder.layers.0.use_rope"}  # beside convert.py's common ones


def torch_names(cfg: ml_collections.ConfigDict, sessions: Sequence[TorchSession]) -> list[Name]:
  """Our params <-> the original's keys. Session i is `stitcher_dict.{key}` / `stitch_decoder_dict.{key}` (its
  real neurons: padded ones carry nothing) and row `row` of `embed_session`."""
  names = [*tn.linear(("embed_spikes",), "encoder.embedder.embed_spikes"),
           *tn.linear(("projection",), "encoder.embedder.projection")]
  if cfg.position == "learned":
    names.append(Name(("embed_pos", "embedding"), "encoder.embedder.embed_pos.weight"))
  if cfg.use_prompt:
    names.append(Name(("embed_prompt", "embedding"), "encoder.embedder.embed_prompt.weight"))
  if cfg.use_session:
    names.append(Name(("embed_session", "embedding"), "encoder.embedder.embed_session.weight",
                      rows=tuple(s.row for s in sessions)))
  names += tn.encoder_layers(cfg)
  for i, s in enumerate(sessions):
    n = slice(0, s.num_neurons)
    into, out_of = f"encoder.stitcher.stitcher_dict.{s.key}", f"stitch_decoder.stitch_decoder_dict.{s.key}"
    names += [Name(("stitch_in", "kernel"), f"{into}.weight", transpose=True, index=(i, n)),
              Name(("stitch_in", "bias"), f"{into}.bias", index=(i,)),
              Name(("stitch_out", "kernel"), f"{out_of}.weight", transpose=True, index=(i, slice(None), n)),
              Name(("stitch_out", "bias"), f"{out_of}.bias", index=(i, n))]
  return names


def params_from_torch(state_dict: dict[str, np.ndarray], cfg: ml_collections.ConfigDict,
                      sessions: Sequence[TorchSession], n_max: int | None = None) -> nnx.State:
  """An nnx.State of Params for `NDT1(cfg, num_sessions=len(sessions), n_max=...)` (load with `nnx.update`)."""
  if not cfg.stitching and len(sessions) != 1:
    raise UserError("cfg.stitching=False has one shared stitch layer: pass exactly one session")
  n_max = n_max or max(s.num_neurons for s in sessions)
  abstract = nnx.state(nnx.eval_shape(lambda: NDT1(cfg, num_sessions=len(sessions), n_max=n_max,
                                                   rngs=nnx.Rngs(0))), nnx.Param)
  return tn.import_params(state_dict, torch_names(cfg, sessions), abstract, TORCH_IGNORED, "NDT1")


def params_to_torch(params, cfg: ml_collections.ConfigDict, sessions: Sequence[TorchSession]
                    ) -> dict[str, np.ndarray]:
  """Our params as an original state dict, the inverse of `params_from_torch` (zeros for the unused head).

  Raises:
    UserError: for a config the original cannot express, or two sessions with equal N but different stitchers
      (the original keys stitchers by N).
  """
  if not cfg.stitching:
    raise UserError("the original keeps per-session stitchers only: cfg.stitching must be True")
  try:
    sd = tn.export_params(params, torch_names(cfg, sessions))
  except UserError:
    n = next(s.num_neurons for i, s in enumerate(sessions) if s.key in [t.key for t in sessions[:i]])
    raise UserError(f"two sessions have N={n} but different stitch layers: the original keys stitchers by "
                    f"neuron count and can hold only one") from None
  sd["decoder.0.weight"] = np.zeros((cfg.n_channels, cfg.hidden_size), np.float32)
  sd["decoder.0.bias"] = np.zeros(cfg.n_channels, np.float32)
  return sd


def params_from_torch_state_dict(state_dict, cfg, session_keys: list[str], session_rows: list[int], *,
                                 n_max: int | None = None) -> nnx.State:
  """`params_from_torch` with session i = stitcher `session_keys[i]` (str(N)) and token row `session_rows[i]`."""
  if len(session_rows) != len(session_keys):
    raise UserError(f"{len(session_keys)} session_keys but {len(session_rows)} session_rows")
  keys = stitchers(state_dict)
  sessions = [TorchSession(str(i), keys.get(k, int(k) if k.isdigit() else 0), r, k)
              for i, (k, r) in enumerate(zip(session_keys, session_rows))]
  return params_from_torch(state_dict, cfg, sessions, n_max)


def stitchers(state_dict: dict[str, np.ndarray]) -> dict[str, int]:
  """Stitcher key -> neuron count, in the checkpoint's order."""
  return {m.group(1): state_dict[name].shape[1] for name in state_dict if (m := _STITCHER.match(name))}


def is_torch_checkpoint(state_dict) -> bool:
  return any(_STITCHER.match(name) for name in state_dict) or "encoder.embedder.embed_pos.weight" in state_dict


def config_from_torch(ckpt: TorchCheckpoint, *, num_heads: int | None = None,
                      log: Callable[[str], None] = print) -> ml_collections.ConfigDict:
  """Our `model` config for the checkpoint: sizes from tensor shapes, the rest from the pickle or defaults."""
  sd, attrs = ckpt.state_dict, ckpt.attrs
  required = ["encoder.embedder.embed_spikes.weight", "encoder.embedder.projection.weight",
              "encoder.layers.0.mlp.up_proj.weight"]
  missing = [name for name in required if name not in sd]
  if missing:
    raise ConvertError(f"not an NDT1 state dict: no {', '.join(missing)} (has {len(sd)} tensors)")
  if not stitchers(sd):
    raise ConvertError("no per-session stitchers (encoder.stitcher.stitcher_dict.*): only stitching "
                       "checkpoints can be converted")
  cfg = default_config("small")
  embed_out, channels = sd["encoder.embedder.embed_spikes.weight"].shape
  if embed_out % channels:
    raise ConvertError(f"embed_spikes maps {channels} -> {embed_out}: not a whole multiple")
  layer_ids = sorted({int(m.group(1)) for name in sd if (m := _LAYER.match(name))})
  if layer_ids != list(range(len(layer_ids))):
    raise ConvertError(f"encoder layers {layer_ids} are not numbered 0..L-1")
  cfg.update(n_channels=int(channels), embed_mult=int(embed_out // channels),
             hidden_size=int(sd["encoder.embedder.projection.weight"].shape[0]), num_layers=len(layer_ids),
             mlp_size=int(sd["encoder.layers.0.mlp.up_proj.weight"].shape[0]), stitching=True,
             use_prompt="encoder.embedder.embed_prompt.weight" in sd,
             use_session="encoder.embedder.embed_session.weight" in sd,
             norm="scalenorm" if "encoder.out_norm.scale" in sd else "layernorm",
             causal_prefix="original", dtype="float32", gelu_approximate=False, norm_eps=1e-5)
  if cfg.use_prompt:
    cfg.num_prompts = int(sd["encoder.embedder.embed_prompt.weight"].shape[0])
  _set_position(cfg, sd, attrs, log)
  cfg.num_heads = tn.num_heads(attrs, num_heads, log, " (the mtm_ndt1_small fixture has 4)")
  if cfg.hidden_size % cfg.num_heads:
    raise ConvertError(f"hidden size {cfg.hidden_size} is not divisible by {cfg.num_heads} heads")
  tn.apply_pickled_attrs(cfg, attrs, OUR_PROMPT_IDX)
  return cfg


def _set_position(cfg, sd, attrs, log) -> None:
  learned = "encoder.embedder.embed_pos.weight" in sd
  if learned and attrs.get("use_rope"):
    raise ConvertError("the checkpoint uses both a learned position embedding and RoPE: not supported")
  if learned:
    cfg.position, cfg.max_bins = "learned", int(sd["encoder.embedder.embed_pos.weight"].shape[0])
  elif attrs.get("use_rope", True):
    cfg.position = "rope"
    if "use_rope" not in attrs:
      log("note: no position embedding in the state dict: assuming RoPE")
  else:
    raise ConvertError("the checkpoint has neither a position embedding nor RoPE: not supported")


def torch_sessions(ckpt: TorchCheckpoint, eids: Sequence[str] | None, num_neurons: Sequence[int] | None,
                   log: Callable[[str], None] = print) -> list[TorchSession]:
  return resolve_sessions(stitchers(ckpt.state_dict), tn.eid_rows(ckpt.attrs), eids, num_neurons, log)


def resolve_sessions(keys: dict[str, int], rows: dict[str, int] | None, eids: Sequence[str] | None,
                     num_neurons: Sequence[int] | None, log: Callable[[str], None] = print) -> list[TorchSession]:
  """Pairs each eid with a stitcher (by order, or by neuron count) and a session-token row.

  The original keys its stitchers by neuron count, so two sessions with equal N share one, and it does not
  record which eid owns which stitcher: `eids` name our sessions, one per stitcher in the checkpoint's order, or
  with `num_neurons` one N per eid (then sessions may share a stitcher; each gets its own copy here).
  """
  counts = ", ".join(map(str, keys.values()))
  if eids is None:
    if rows is None or len(rows) != len(keys):
      table = f" and an eid table of {len(rows)} sessions" if rows else ""
      raise ConvertError(f"the checkpoint has {len(keys)} stitchers (N = {counts}){table} but does not say "
                         "which eid owns which stitcher: pass --eids, one per stitcher in that order (or "
                         "with --num-neurons)")
    eids = sorted(rows, key=rows.get)
  eids = list(eids)
  if len(set(eids)) != len(eids):
    raise ConvertError(f"--eids repeats an eid: {','.join(eids)}")
  if num_neurons is None:
    if len(eids) != len(keys):
      raise ConvertError(f"{len(eids)} eids for {len(keys)} stitchers (N = {counts}): pass one eid per "
                         "stitcher, or --num-neurons with one N per eid")
    stitcher_of = list(keys)
    log(_order_warning(eids, [keys[k] for k in stitcher_of]))
  else:
    if len(num_neurons) != len(eids):
      raise ConvertError(f"{len(eids)} eids but {len(num_neurons)} --num-neurons")
    owners: dict[int, list[str]] = {}
    for k, n in keys.items():
      owners.setdefault(n, []).append(k)
    unknown = [n for n in num_neurons if n not in owners]
    if unknown:
      raise ConvertError(f"no stitcher for N = {unknown}; the checkpoint has N = {counts}")
    ambiguous = sorted({n for n in num_neurons if len(owners[n]) > 1})
    if ambiguous:
      n = ambiguous[0]
      raise ConvertError(f"ambiguous: stitchers {', '.join(owners[n])} all have N = {n}, so the neuron count "
                         f"cannot say which one a session owns; pass --eids in the checkpoint's stitcher order "
                         f"without --num-neurons")
    stitcher_of = [owners[n][0] for n in num_neurons]
  rows = tn.session_rows(rows, eids, log)
  return [TorchSession(eid, keys[k], rows[eid], k) for eid, k in zip(eids, stitcher_of)]


def _order_warning(eids: Sequence[str], num_neurons: Sequence[int]) -> str:
  """The eid-to-stitcher table of a pairing by order, which nothing in the checkpoint can confirm."""
  table = "\n".join(f"    {eid}  ->  stitcher with N = {n}" for eid, n in zip(eids, num_neurons))
  return ("warning: the checkpoint does not record which eid owns which stitcher; --eids were paired with the "
          "stitchers in the checkpoint's order:\n" + table + "\n  check each session's neuron count against its "
          "stitcher's (python -m ibl_jax.data info SESSION), or pass --num-neurons N1,N2,... or --sessions "
          "DIR1,DIR2,... to pair them by neuron count instead")
