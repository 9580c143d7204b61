"""Supervised decoding heads on any family's encoder (`model.decode_targets`; docs/design.md §13).

A head reads the encoder's per-bin output `hidden_BxTxH` (the contract's `Model.encode`):

  choice, block (per trial, classes in CLASSES)   masked mean over each of POOL_WINDOWS equal time windows,
                                                  concatenated -> Linear(POOL_WINDOWS·H -> classes) -> logits
  wheel-speed, whisker-motion-energy (per bin)    Linear(H -> 1) at every bin -> the standardised trace

Window means, not the flattened bins × hidden: a session has tens of trials, too few for T·H weights per class;
and not one mean over the trial, which loses when in the trial a choice shows (the linear decoders' windows too).
Traces are predicted standardised per session (train-split mean and std, `ibl_jax.data.batches`), so one head
serves sessions whose wheels and cameras differ in scale; R² is unchanged by that affine map.

The head is one top-level parameter, HEAD (`decoding_head/<target>/{kernel, bias}`), attached by
`models.build` when `model.decode_targets` is set, so checkpoints, sharding and freezing see it like any other.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ibl_jax.data import schema
from ibl_jax.errors import UserError

HEAD = "decoding_head"  # the top-level param name
# Class values of the per-trial targets (IBL: choice -1 / +1, block prior 0.2 / 0.5 / 0.8); a trial whose value is
# not listed (e.g. a no-go choice, 0) is not scored.
CLASSES = schema.CLASS_VALUES
TRACES = schema.TRACE_BEHAVIOURS
TARGETS = (*CLASSES, *TRACES)
POOL_WINDOWS = 5  # as the linear choice decoder's (ibl_jax/evaluate/decoding.py, CHOICE_WINDOWS)


def parse_targets(spec: str | Sequence[str] | None) -> tuple[str, ...]:
  """Targets from a comma list ("" or None: none), checked against TARGETS, in the given order."""
  names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec or ()) if t.strip()]
  unknown = [t for t in names if t not in TARGETS]
  if unknown:
    raise UserError(f"model.decode_targets: unknown target {unknown[0]!r}; choose from {', '.join(TARGETS)}")
  return tuple(dict.fromkeys(names))


def key_of(target: str) -> str:
  """The param/batch-safe name of a target (wheel-speed -> wheel_speed)."""
  return target.replace("-", "_")


class DecodingHead(nnx.Module):
  """One linear readout per target; returns {target: logits [B, classes] or standardised trace [B, T]}."""

  def __init__(self, targets: Sequence[str], hidden_size: int, *, rngs: nnx.Rngs):
    self.targets = tuple(targets)
    self.readouts = nnx.Dict({
        key_of(t): nnx.Linear(POOL_WINDOWS * hidden_size, len(CLASSES[t]), rngs=rngs) if t in CLASSES else
                   nnx.Linear(hidden_size, 1, rngs=rngs) for t in self.targets})

  def __call__(self, hidden_BxTxH: jax.Array, time_mask_BxT: jax.Array) -> dict[str, jax.Array]:
    pooled_BxWH = window_means(hidden_BxTxH, time_mask_BxT, POOL_WINDOWS)
    out = {}
    for t in self.targets:
      readout = self.readouts[key_of(t)]
      out[t] = readout(pooled_BxWH) if t in CLASSES else readout(hidden_BxTxH)[..., 0]
    return out


def window_means(x_BxTxH: jax.Array, time_mask_BxT: jax.Array, n_windows: int) -> jax.Array:
  """Masked means of x over `n_windows` equal time windows, concatenated: [B, n_windows·H] (0 for an empty one)."""
  B, T, H = x_BxTxH.shape
  edges = np.linspace(0, T, n_windows + 1).round().astype(int)
  t_T = np.arange(T)
  window_WxT = (t_T[None, :] >= edges[:-1, None]) & (t_T[None, :] < edges[1:, None])
  weights_BxWxT = jnp.asarray(window_WxT, jnp.float32)[None] * jnp.asarray(time_mask_BxT, jnp.float32)[:, None, :]
  sums_BxWxH = jnp.einsum("bwt,bth->bwh", weights_BxWxT, x_BxTxH)
  means_BxWxH = sums_BxWxH / jnp.maximum(weights_BxWxT.sum(-1, keepdims=True), 1.0)
  return means_BxWxH.reshape(B, n_windows * H)


def attach(model: nnx.Module, model_cfg, seed: int = 0) -> nnx.Module:
  """Gives `model` its decoding head when `model_cfg.decode_targets` names targets (else leaves it as is)."""
  targets = parse_targets(model_cfg.get("decode_targets"))
  if targets:
    # Its own seed stream: adding a head leaves the encoder's initial values as they were.
    setattr(model, HEAD, DecodingHead(targets, model_cfg.hidden_size, rngs=nnx.Rngs(seed + 1_000_003)))
  return model


def decode(model: nnx.Module, spikes_BxTxN, time_mask_BxT, session_idx_B, prompt_idx, causal, *,
           deterministic: bool = True, rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
  """The head's outputs for a batch: encode (any family), then read out."""
  head = getattr(model, HEAD, None)
  if head is None:
    raise UserError("the model has no decoding head: set model.decode_targets (e.g. choice,whisker-motion-energy)")
  hidden_BxTxH = model.encode(spikes_BxTxN, time_mask_BxT, session_idx_B, prompt_idx, causal,
                              deterministic=deterministic, rngs=rngs)
  return head(hidden_BxTxH, time_mask_BxT)
