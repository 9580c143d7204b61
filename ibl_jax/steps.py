"""The jitted functions of training: init, train step, validation step. Pure functions over pytrees.

`params` is the model's parameter tree as a plain nested dict (`nnx.split` + `nnx.to_pure_dict`), which is
what optax updates, Orbax saves and sharding rules map over; `nnx.merge(graphdef, params)` rebuilds the
model inside each traced function.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ibl_jax import losses, masking
from ibl_jax.models import ndt1
from ibl_jax.errors import UserError


def build_model(model_cfg, *, num_sessions: int, n_max: int, seed: int = 0) -> nnx.Module:
  if model_cfg.name != "ndt1":
    raise UserError(f"model.name={model_cfg.name!r}: only 'ndt1' is implemented")
  return ndt1.NDT1(model_cfg, num_sessions=num_sessions, n_max=n_max, rngs=nnx.Rngs(seed))


def split_params(model: nnx.Module):
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


@dataclasses.dataclass(frozen=True)
class Steps:
  """The compiled-once functions of one run (model structure, optimiser and masking are fixed)."""
  graphdef: Any
  tx: optax.GradientTransformation
  masking_cfg: Any
  loss_reduction: str = "mean"  # "mean" per target entry (ours) | "sum" over target entries (the original)

  def forward(self, params, inputs_BxTxN, batch, prompt_idx, causal, *, key=None):
    model = nnx.merge(self.graphdef, params)
    return model(inputs_BxTxN, batch["time_mask"], batch["session_idx"], prompt_idx, causal,
                 deterministic=key is None, rngs=None if key is None else nnx.Rngs(dropout=key))

  def train_step(self, params, opt_state, batch, step, base_key):
    """One optimiser step. The step's randomness is `fold_in(base_key, step)`: a resumed run replays it."""
    key_mask, key_dropout = jax.random.split(jax.random.fold_in(base_key, step))
    masked = masking.mask_and_prompt(key_mask, batch, self.masking_cfg)

    def loss_fn(p):
      log_rates = self.forward(p, masked.inputs_BxTxN, batch, masked.prompt_idx, masked.causal, key=key_dropout)
      total, count = losses.masked_poisson_nll(log_rates, batch["spikes"], masked.targets_mask_BxTxN)
      return losses.reduce(total, count, self.loss_reduction), count

    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "targets": count, "grad_norm": optax.global_norm(grads),
               "scheme_id": masked.scheme_id}
    return params, opt_state, metrics

  def eval_loss(self, params, batch, scheme_id, key):
    """Validation Poisson NLL (sum, count) of one scheme on a batch, masks drawn from `key`."""
    masked = masking.mask_batch(key, batch, scheme_id, ratio=self.masking_cfg.ratio,
                                causal_ratio=self.masking_cfg.causal_ratio)
    log_rates = self.forward(params, masked.inputs_BxTxN, batch, masked.prompt_idx, masked.causal)
    return losses.masked_poisson_nll(log_rates, batch["spikes"], masked.targets_mask_BxTxN)

  def heldout_rates(self, params, batch, neuron_j):
    """Co-smoothing of one neuron slot: zero neuron `neuron_j` on all bins, return its predicted rate [B, T]."""
    spikes = batch["spikes"].astype(jnp.float32)
    inputs = spikes.at[:, :, neuron_j].set(0.0)
    log_rates = self.forward(params, inputs, batch, jnp.int32(masking.PROMPT_IDX[0]), jnp.bool_(False))
    return jnp.exp(log_rates[:, :, neuron_j])


def compiled(steps: Steps, *, param_sharding, opt_sharding, batch_sharding, replicated) -> dict[str, Callable]:
  """`jax.jit` each step with explicit shardings; the train step donates params and optimiser state."""
  return {
      "train_step": jax.jit(steps.train_step,
                            in_shardings=(param_sharding, opt_sharding, batch_sharding, replicated, replicated),
                            out_shardings=(param_sharding, opt_sharding, replicated), donate_argnums=(0, 1)),
      "eval_loss": jax.jit(steps.eval_loss, in_shardings=(param_sharding, batch_sharding, replicated, replicated),
                           out_shardings=replicated),
      # Replicated outputs: every process can read them (a multi-process run reads only addressable data).
      "heldout_rates": jax.jit(steps.heldout_rates, in_shardings=(param_sharding, batch_sharding, replicated),
                               out_shardings=replicated),
  }
