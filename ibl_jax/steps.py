"""The jitted functions of training: init, train step, validation step. Pure functions over pytrees.

`params` is the model's parameter tree as a plain nested dict (`nnx.split` + `nnx.to_pure_dict`), which is
what optax updates, Orbax saves and sharding rules map over; `nnx.merge(graphdef, params)` rebuilds the
model inside each traced function.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ibl_jax import masking, models, objectives, optim
from ibl_jax.models import heads


def build_model(model_cfg, *, num_sessions: int, n_max: int, session_neurons=None, session_regions=None,
                seed: int = 0) -> nnx.Module:
  """The model family `model_cfg.name` (ibl_jax/models/__init__.py); `session_neurons`: N of each session,
  `session_regions`: each session's neuron region ids."""
  return models.build(model_cfg, num_sessions=num_sessions, n_max=n_max, session_neurons=session_neurons,
                      session_regions=session_regions, seed=seed)


def split_params(model: nnx.Module):
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


@dataclasses.dataclass(frozen=True)
class Steps:
  """The compiled-once functions of one run (model structure, optimiser and objective are fixed)."""
  graphdef: Any
  tx: Any  # optim.Optimizer
  masking_cfg: Any
  objective: str = "mtm"  # training.objective (ibl_jax/objectives.py)
  loss_reduction: str = "mean"  # "mean" per target entry (ours) | "sum" over target entries (the original)
  decode_targets: tuple[str, ...] = ()  # the supervised objective's targets (model.decode_targets)
  decode_prompt: str = "neuron"  # the supervised objective's prompt (training.decode_prompt)
  rows_sharding: Any = None  # where a step's gathered session rows live (`compiled` sets it: replicated)

  @property
  def _objective(self):
    return objectives.make(self.objective, self.masking_cfg, loss_reduction=self.loss_reduction,
                           targets=self.decode_targets, prompt=self.decode_prompt)

  def forward(self, params, inputs_BxTxN, batch, prompt_idx, causal, *, key=None, output: str = "log_rates"):
    """The model's log-rates, or with output="decode" its decoding head's outputs ({target: ...})."""
    model = nnx.merge(self.graphdef, params)
    call = model if output == "log_rates" else functools.partial(heads.decode, model)
    return call(inputs_BxTxN, batch["time_mask"], batch["session_idx"], prompt_idx, causal,
                deterministic=key is None, rngs=None if key is None else nnx.Rngs(dropout=key))

  def _on_batch_rows(self, params, batch):
    """(forward, params, rows_U): with lazy session rows (`optim.py`), the params cut to the batch's sessions'
    rows and a forward that re-indexes the batch into them; else the full params. The rows are placed as
    `rows_sharding` (replicated): with the tables split over the devices (`parallel.param_shardings`) a step
    then gathers its rows once, instead of XLA splitting the whole model's activations the tables' way."""
    if getattr(self.tx, "session_rows", None) is None:  # no optimiser (evaluation) or dense rows
      return self.forward, params, None
    num_sessions = next(p.shape[0] for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(self.tx.session_rows))
                        if s)
    rows_U, local_idx_B = optim.batch_rows(batch["session_idx"], num_sessions)
    taken = optim.take_rows(params, self.tx.session_rows, rows_U)
    if self.rows_sharding is not None:
      taken = jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(x, self.rows_sharding) if s else x,
                           taken, self.tx.session_rows)
    forward = lambda p, x, b, *a, **k: self.forward(p, x, {**b, "session_idx": local_idx_B}, *a, **k)
    return forward, taken, rows_U

  def decode(self, params, batch):
    """The decoding head's outputs on a batch's unmasked spikes (supervised objective only), no dropout."""
    forward, params, _ = self._on_batch_rows(params, batch)
    return self._objective.decode(forward, params, batch)

  def train_step(self, params, opt_state, batch, step, base_key):
    """One optimiser step. The step's randomness is `fold_in(base_key, step)`: a resumed run replays it.

    With an optimiser of lazy session rows (`optim.py`), the loss is differentiated with respect to the batch's
    sessions' rows alone (re-indexed), so nothing here grows with the number of sessions.
    """
    key = jax.random.fold_in(base_key, step)
    forward, trained, rows_U = self._on_batch_rows(params, batch)
    (loss, aux), grads = jax.value_and_grad(self._objective.train_loss, argnums=1, has_aux=True)(
        forward, trained, batch, key)
    params, opt_state = self.tx.step(grads, opt_state, params, rows_U)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}
    return params, opt_state, metrics

  def eval_loss(self, params, batch, scheme_id, key):
    """Validation loss (sum, count) of one masking scheme on a batch, masks drawn from `key`."""
    forward, params, _ = self._on_batch_rows(params, batch)
    return self._objective.eval_loss(forward, params, batch, scheme_id, key)

  def heldout_rates(self, params, batch, neuron_j):
    """Co-smoothing of one neuron slot: zero neuron `neuron_j` on all bins, return its predicted rate [B, T]."""
    spikes = batch["spikes"].astype(jnp.float32)
    inputs = spikes.at[:, :, neuron_j].set(0.0)
    forward, params, _ = self._on_batch_rows(params, batch)
    log_rates = forward(params, inputs, batch, jnp.int32(masking.PROMPT_IDX[0]), jnp.bool_(False))
    return jnp.exp(log_rates[:, :, neuron_j])


def compiled(steps: Steps, *, param_sharding, opt_sharding, batch_sharding, replicated) -> dict[str, Callable]:
  """`jax.jit` each step with explicit shardings; the train step donates params and optimiser state."""
  steps = dataclasses.replace(steps, rows_sharding=replicated)
  return {
      "train_step": jax.jit(steps.train_step,
                            in_shardings=(param_sharding, opt_sharding, batch_sharding, replicated, replicated),
                            out_shardings=(param_sharding, opt_sharding, replicated), donate_argnums=(0, 1)),
      "eval_loss": jax.jit(steps.eval_loss, in_shardings=(param_sharding, batch_sharding, replicated, replicated),
                           out_shardings=replicated),
      # Replicated outputs: every process can read them (a multi-process run reads only addressable data).
      "heldout_rates": jax.jit(steps.heldout_rates, in_shardings=(param_sharding, batch_sharding, replicated),
                               out_shardings=replicated),
      "decode": jax.jit(steps.decode, in_shardings=(param_sharding, batch_sharding), out_shardings=replicated),
  }
