"""Training objectives: what a train step asks of the model, named by `training.objective`.

An objective turns (forward, params, batch, key) into a scalar loss and its metrics; the loop (`steps.Steps`)
only differentiates and applies it, so a supervised objective (e.g. decoding behaviour) is a new class here,
registered in OBJECTIVES, and no change to the loop.

  forward(params, inputs_BxTxN, batch, prompt_idx, causal, *, key) -> log_rates_BxTxN (any model family)
  forward(..., output="decode") -> {target: logits_BxC | trace_BxT}  (the decoding head, ibl_jax/models/heads.py)

Every objective returns metrics with `targets` (entries or trials scored) and `scheme_id` (the masking scheme of
the step; 0 when there is none), which the loop logs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ibl_jax import losses, masking
from ibl_jax.models import heads
from ibl_jax.errors import UserError


class MaskedModelling:
  """MtM (Zhang et al. 2024): hide entries with a masking scheme, predict them with a Poisson NLL."""

  def __init__(self, masking_cfg: Any, loss_reduction: str = "mean"):
    self.masking_cfg = masking_cfg
    self.loss_reduction = loss_reduction  # losses.reduce: "mean" per target entry | "sum" (the original)

  def train_loss(self, forward: Callable, params, batch, key: jax.Array):
    """(Poisson NLL over the target entries, reduced, metrics). `key` draws the scheme, the masks and dropout."""
    key_mask, key_dropout = jax.random.split(key)
    masked = masking.mask_and_prompt(key_mask, batch, self.masking_cfg)
    log_rates = forward(params, masked.inputs_BxTxN, batch, masked.prompt_idx, masked.causal, key=key_dropout)
    total, count = losses.masked_poisson_nll(log_rates, batch["spikes"], masked.targets_mask_BxTxN)
    return losses.reduce(total, count, self.loss_reduction), {"targets": count, "scheme_id": masked.scheme_id}

  def eval_loss(self, forward: Callable, params, batch, scheme_id, key: jax.Array):
    """Validation Poisson NLL (sum, count) of one scheme, masks drawn from `key`, no dropout."""
    c = self.masking_cfg
    masked = masking.mask_batch(key, batch, scheme_id, ratio=c.ratio, causal_ratio=c.causal_ratio,
                                token_shape=masking.token_shape(c))
    log_rates = forward(params, masked.inputs_BxTxN, batch, masked.prompt_idx, masked.causal)
    return losses.masked_poisson_nll(log_rates, batch["spikes"], masked.targets_mask_BxTxN)


def target_losses(outputs: dict, batch, targets) -> tuple[jax.Array, jax.Array]:
  """Per target, (summed loss, count) over the scored entries: [len(targets)] each.

  Classes: cross-entropy per trial with a label >= 0. Traces: squared error of the standardised trace per scored
  bin (`<target>_mask`).
  """
  sums, counts = [], []
  for t in targets:
    if t in heads.CLASSES:
      labels_B = batch[t]
      scored_B = labels_B >= 0
      nll_B = -jnp.take_along_axis(jax.nn.log_softmax(outputs[t]), jnp.maximum(labels_B, 0)[:, None], 1)[:, 0]
      sums.append(jnp.where(scored_B, nll_B, 0.0).sum())
      counts.append(scored_B.sum().astype(jnp.float32))
    else:
      scored_BxT = batch[f"{t}_mask"]
      sums.append(jnp.where(scored_BxT, (outputs[t] - batch[t]) ** 2, 0.0).sum())
      counts.append(scored_BxT.sum().astype(jnp.float32))
  return jnp.stack(sums), jnp.stack(counts)


class Supervised:
  """Behaviour decoding (the original's `sl` mode): a head on the encoder (`model.decode_targets`) fit to the
  trials' choice / block (cross-entropy) and wheel / whisker traces (squared error, standardised), from the
  unmasked spikes under one prompt. The loss is the sum over targets of each target's mean, so every target
  weighs the same whatever its number of scored entries."""

  def __init__(self, targets, prompt: str = "neuron"):
    self.targets = heads.parse_targets(targets)
    if not self.targets:
      raise UserError("training.objective='supervised' needs model.decode_targets (e.g. choice,wheel-speed)")
    if prompt not in masking.MTM_SCHEMES:
      raise UserError(f"training.decode_prompt={prompt!r}: choose one of {', '.join(masking.MTM_SCHEMES)}")
    self.prompt_idx = masking.PROMPT_IDX[masking.MTM_SCHEMES.index(prompt)]
    self.causal = prompt == "causal"

  def decode(self, forward: Callable, params, batch, key=None) -> dict:
    spikes = batch["spikes"].astype(jnp.float32)
    return forward(params, spikes, batch, jnp.int32(self.prompt_idx), jnp.bool_(self.causal), key=key,
                   output="decode")

  def train_loss(self, forward: Callable, params, batch, key: jax.Array):
    sums, counts = target_losses(self.decode(forward, params, batch, key), batch, self.targets)
    loss = jnp.sum(sums / jnp.maximum(counts, 1.0))
    return loss, {"targets": counts.sum(), "scheme_id": jnp.int32(0)}

  def eval_loss(self, forward: Callable, params, batch, scheme_id, key: jax.Array):
    """Per target (summed loss, count) on a batch, no dropout; `scheme_id` and `key` are unused."""
    del scheme_id, key
    return target_losses(self.decode(forward, params, batch), batch, self.targets)


OBJECTIVES = {"mtm": MaskedModelling, "supervised": Supervised}
BEHAVIOUR_OBJECTIVES = ("supervised",)  # their batches carry the decoded behaviours


def make(name: str, masking_cfg: Any, loss_reduction: str = "mean", *, targets=(), prompt: str = "neuron"):
  """The objective `name` (`training.objective`; "mtm" when a config has none)."""
  if name not in OBJECTIVES:
    raise UserError(f"training.objective={name!r}: choose one of {', '.join(OBJECTIVES)}")
  if name == "supervised":
    return Supervised(targets, prompt)
  return OBJECTIVES[name](masking_cfg, loss_reduction=loss_reduction)
