"""The model-family contract: `model.name` -> the module `ibl_jax.models.<name>`.

Training, evaluation, fine-tuning, benchmarking and conversion know a model only through this contract, so a new
family is one file here (plus its `configs/<name>.py` and tests). A family module provides:

  Model(cfg, *, num_sessions, n_max, session_neurons, session_regions, rngs)   the Flax NNX module; called as
      model(spikes_BxTxN, time_mask_BxT, session_idx_B, prompt_idx, causal, *, deterministic=True, rngs=None)
      -> float32 log-rates [B, T, n_max]. spikes: (masked) counts, zero at padded neurons; time_mask: True at real
      bins; session_idx: int per trial; prompt_idx: int32 scalar or [B]; causal: bool scalar (may be traced).
      session_neurons[s] is session s's real neuron count (columns >= it are padding); session_regions[s] its
      neurons' region ids (corpus vocabulary) or None (a family may ignore them; NDT2 embeds them per patch).
      model.encode(same arguments) -> float32 [B, T, H]: the encoder's output per bin, after the final norm
      (what a supervised decoding head reads, ibl_jax/models/heads.py; NDT2 pools its patches per bin).
  default_config(size) -> ConfigDict                             the `model` section, size "small" or "paper"
  ARCHITECTURE                                                   config fields that fix the parameter shapes
  SESSION_PARAMS                                                 top-level param names holding one row per session
  flops_per_trial(cfg, T, n_max) -> int                          forward matmul FLOPs of one trial
  activation_bytes_per_row(cfg, T, n_max) -> int                 forward memory of one evaluated row (chunk sizing)
  torch_names(cfg, sessions) -> list[torch_names.Name]           ONE name table, used for import and export by
  params_from_torch(state_dict, cfg, sessions) / params_to_torch(params, cfg, sessions)   (torch_names.py)
  TORCH_IGNORED                                                  torch key prefixes an import may drop
  TORCH_ATTRS                                                    our name -> dotted attribute of a pickled original
  is_torch_checkpoint(state_dict) -> bool                        whether an original state dict is this family's
  config_from_torch(ckpt, *, num_heads, log) -> ConfigDict       our `model` config for an original checkpoint
  torch_sessions(ckpt, eids, num_neurons, log) -> list[TorchSession]   which torch rows become our sessions

Optional:
  LOG_RATE_BIAS                                                  path of the bias added to the log-rates: [S, N_max]
      per session (NDT1's stitch-out bias), started by `training.init_log_rate_bias` at each neuron's log mean
      count (`log_rate_bias`), or 1-D and shared (NDT2's decoder), started at the corpus's (`shared_log_rate`).
  SPARSE_SESSION_ROWS = True                                     the model uses session_idx only to look up rows of
      SESSION_PARAMS: a train step then passes it only its batch's rows, re-indexed, and updates them lazily
      (ibl_jax/optim.py), so the step's cost does not grow with the number of sessions. Default False.
  model.input_prefix(spikes_BxTxN, session_idx_B) -> [B, T, E] and model.neuron_prefix(session_idx) -> [N_max, E],
      with model(..., prefix_BxTxE=...): the model is affine in its counts up to a first non-linearity, whose
      pre-activation these give (NDT1: stitch-in then embed_spikes); leave-one-out evaluation then computes it
      once per trial and corrects it per zeroed neuron (ibl_jax/evaluate/heldout.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ibl_jax.errors import UserError

CONTRACT = ("Model", "default_config", "ARCHITECTURE", "SESSION_PARAMS", "flops_per_trial",
            "activation_bytes_per_row", "torch_names", "params_from_torch", "params_to_torch", "TORCH_IGNORED",
            "TORCH_ATTRS", "is_torch_checkpoint", "config_from_torch", "torch_sessions")
_NOT_FAMILIES = ("fused_attention", "heads", "layers", "looped_attention", "stitching", "torch_names")  # helper modules of this package


def known() -> tuple[str, ...]:
  """The families in this package: every module but the helpers (for messages and checkpoint detection)."""
  import pkgutil  # pylint: disable=g-import-not-at-top
  return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_FAMILIES))


def family(name: str) -> ModuleType:
  """The module of model family `name` (e.g. `model.name` of a config)."""
  if not isinstance(name, str) or not name.isidentifier():
    raise UserError(f"model.name={name!r}: choose one of {', '.join(known())}")
  try:
    module = importlib.import_module(f"ibl_jax.models.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"ibl_jax.models.{name}":
      raise
    raise UserError(f"model.name={name!r}: no module ibl_jax/models/{name}.py; choose one of "
                    f"{', '.join(known())}") from None
  missing = [attr for attr in CONTRACT if not hasattr(module, attr)]
  if missing:
    raise UserError(f"model.name={name!r}: ibl_jax/models/{name}.py is not a model family (lacks "
                    f"{', '.join(missing)})")
  return module


def of(model_cfg) -> ModuleType:
  """The family of a `model` config section."""
  return family(model_cfg.name)


def build(model_cfg, *, num_sessions: int, n_max: int, session_neurons: Sequence[int] | None = None,
          session_regions: Sequence[Sequence[int]] | None = None, seed: int = 0) -> nnx.Module:
  """The family's module, with a decoding head (`heads.HEAD`) when `model_cfg.decode_targets` names targets.

  `session_neurons` defaults to n_max for every session (no neuron padding); `session_regions` (each session's
  neuron region ids) may be None where the model does not embed regions.
  """
  neurons = tuple(int(n) for n in (session_neurons if session_neurons is not None else [n_max] * num_sessions))
  if len(neurons) != num_sessions or (neurons and max(neurons) > n_max):
    raise UserError(f"session_neurons {list(neurons)} do not fit {num_sessions} sessions of at most {n_max} neurons")
  regions = None
  if session_regions is not None and all(r is not None for r in session_regions):
    regions = tuple(tuple(int(r) for r in ids) for ids in session_regions)
    if [len(r) for r in regions] != list(neurons):
      raise UserError(f"session_regions have {[len(r) for r in regions]} neurons, sessions {list(neurons)}")
  from ibl_jax.models import heads  # pylint: disable=g-import-not-at-top
  model = of(model_cfg).Model(model_cfg, num_sessions=num_sessions, n_max=n_max, session_neurons=neurons,
                              session_regions=regions, rngs=nnx.Rngs(seed))
  return heads.attach(model, model_cfg, seed)


def log_rate_bias(mean_counts: Sequence[np.ndarray], n_max: int, floor: float = 1e-4) -> np.ndarray:
  """[S, N_max] float32: log of each neuron's mean count per bin (floored, so a silent neuron is finite).

  A readout that starts at the neurons' mean rates begins where bits/spike is 0 instead of far below it (a bias
  of 0 predicts one spike per bin), so early steps learn structure rather than firing rates (docs/design.md §5).
  Padded columns get log(floor); they are never scored.
  """
  bias_SxN = np.full((len(mean_counts), n_max), np.log(floor), np.float32)
  for s, mean_N in enumerate(mean_counts):
    bias_SxN[s, :len(mean_N)] = np.log(np.maximum(np.asarray(mean_N, np.float64), floor))
  return bias_SxN


def shared_log_rate(mean_counts: Sequence[np.ndarray], floor: float = 1e-4) -> np.ndarray:
  """float32 scalar: log of the mean count per bin over every real neuron of every session, where a readout
  shared by all sessions and neurons (NDT2's decoder) starts."""
  return np.float32(np.log(max(float(np.concatenate([np.ravel(m) for m in mean_counts]).mean()), floor)))


def set_log_rate_bias(model_cfg, params: dict, bias_SxN, shared=None) -> dict:
  """`params` with the family's LOG_RATE_BIAS set (jit-able): a [S, N_max] leaf to `bias_SxN`, a shared 1-D leaf
  (one row for every session, or NDT2's per-patch decoder) to `shared` everywhere; unchanged when the family has
  none, or the leaf is shared and `shared` is None."""
  path = getattr(of(model_cfg), "LOG_RATE_BIAS", None)
  if path is None:
    return params
  node = params
  for key in path[:-1]:
    node = node[key]
  leaf = node[path[-1]]
  if tuple(leaf.shape) == tuple(bias_SxN.shape):
    value = bias_SxN.astype(leaf.dtype)
  elif leaf.ndim == 1 and shared is not None:
    value = jnp.full(leaf.shape, shared, leaf.dtype)
  else:
    return params
  out = dict(params)
  parent = out
  for key in path[:-1]:
    parent[key] = dict(parent[key])
    parent = parent[key]
  parent[path[-1]] = value
  return out


def detect_torch_family(state_dict) -> ModuleType:
  """The known family whose original checkpoints look like `state_dict`."""
  for name in known():
    module = family(name)
    if module.is_torch_checkpoint(state_dict):
      return module
  raise UserError(f"not a checkpoint of a known original model ({', '.join(known())}); it has {len(state_dict)} "
                  f"tensors, e.g. {', '.join(list(state_dict)[:3])}")


def param_count(params) -> int:
  """Number of scalars in a params pytree (an nnx.State, a pure dict, or abstract shapes)."""
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
