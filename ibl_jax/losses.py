"""Poisson losses on log-rates (docs/design.md §6).

With log-rate ŷ (rate λ = exp(ŷ) spikes per bin), the Poisson negative log-likelihood of a count y is

  −log p(y | λ) = λ − y·log λ + log y! = exp(ŷ) − y·ŷ + log y!.

log y! does not depend on the model, so it is dropped (as `torch.nn.PoissonNLLLoss(log_input=True)` does in the
original): the losses are the NLL up to a data-only constant, and can be negative. Bits per spike
(`metrics.py`) is a difference of NLLs, where the constant cancels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def poisson_nll(log_rates: jax.Array, spikes: jax.Array) -> jax.Array:
  """Elementwise `exp(ŷ) − y·ŷ` in float32 (whatever the compute dtype, so bfloat16 never rounds the loss)."""
  log_rates = jnp.asarray(log_rates).astype(jnp.float32)
  return jnp.exp(log_rates) - jnp.asarray(spikes).astype(jnp.float32) * log_rates


def masked_poisson_nll(log_rates_BxTxN: jax.Array, spikes_BxTxN: jax.Array,
                       targets_mask_BxTxN: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns `(Σ_{target entries} exp(ŷ) − y·ŷ, number of target entries)`, both float32 scalars.

  Sum and count are returned apart so they can be added across devices, steps or schemes before dividing.
  Non-target log-rates are replaced by 0 before `exp` and their terms selected away with `where` (not multiplied
  by 0), so an overflowing rate on a padded entry cannot turn the sum, or its gradient (inf·0), into NaN.
  """
  targets_mask_BxTxN = jnp.asarray(targets_mask_BxTxN, bool)
  nll_BxTxN = poisson_nll(jnp.where(targets_mask_BxTxN, log_rates_BxTxN, 0.0), spikes_BxTxN)
  total = jnp.sum(jnp.where(targets_mask_BxTxN, nll_BxTxN, 0.0))
  count = jnp.sum(targets_mask_BxTxN, dtype=jnp.float32)
  return total, count


def mean_masked_poisson_nll(log_rates_BxTxN: jax.Array, spikes_BxTxN: jax.Array,
                            targets_mask_BxTxN: jax.Array) -> jax.Array:
  """The loss per target entry: `sum / max(count, 1)` (0 when a batch has no targets, never NaN)."""
  total, count = masked_poisson_nll(log_rates_BxTxN, spikes_BxTxN, targets_mask_BxTxN)
  return total / jnp.maximum(count, 1.0)


REDUCTIONS = ("mean", "sum")


def reduce(total: jax.Array, count: jax.Array, reduction: str) -> jax.Array:
  """The training loss from `masked_poisson_nll`'s sum and count.

  "mean": per target entry, so every masking scheme's step has the same scale whatever its number of targets.
  "sum": the original's `PoissonNLLLoss(reduction="sum")`: schemes with more targets (e.g. causal, 60% of bins)
  weigh more per step, and the gradient grows with the batch.
  """
  if reduction == "mean":
    return total / jnp.maximum(count, 1.0)
  if reduction == "sum":
    return total
  raise ValueError(f"loss reduction {reduction!r}: choose from {REDUCTIONS}")
