"""Training objectives: what a train step asks of the model, named by `training.objective`.

An objective turns (forward, params, batch, key) into a scalar loss and its metrics; the loop (`steps.Steps`)
only differentiates and applies it, so a supervised objective (e.g. decoding behaviour) is a new class here,
registered in OBJECTIVES, and no change to the loop.

  forward(params, inputs_BxTxN, batch, prompt_idx, causal, *, key) -> log_rates_BxTxN (any model family)

Every objective returns metrics with `targets` (entries or trials scored) and `scheme_id` (the masking scheme of
the step; 0 when there is none), which the loop logs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ibl_jax import losses, masking
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


OBJECTIVES = {"mtm": MaskedModelling}


def make(name: str, masking_cfg: Any, loss_reduction: str = "mean"):
  """The objective `name` (`training.objective`; "mtm" when a config has none)."""
  if name not in OBJECTIVES:
    raise UserError(f"training.objective={name!r}: choose one of {', '.join(OBJECTIVES)}")
  return OBJECTIVES[name](masking_cfg, loss_reduction=loss_reduction)
