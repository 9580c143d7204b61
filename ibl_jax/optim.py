"""The optimiser: AdamW (the paper's lr 1e-4, weight decay 0.01, eps 1e-8), one-cycle schedule, clipping.

Per-session parameters (stitchers, session embeddings: one row per session, `[S, ...]`) are updated lazily where
the model family allows it (`SPARSE_SESSION_ROWS`): a train step differentiates only the rows of its batch's
sessions (`batch_rows`, `take_rows`) and updates those rows alone, each with its own Adam step count. This is what
the original does (one PyTorch module per session; AdamW skips a module without a gradient), and it keeps the
step's cost flat in the number of sessions: dense gradients and AdamW over every row cost 130 of a 146 ms step at
256 sessions of the small model (zero-filled gradients, their all-reduce over devices, the update; see
docs/performance.md). Every other parameter gets plain AdamW.

An optimiser here is `Optimizer(init, step, session_rows)`: `step(grads, state, params, rows_U)` -> (params,
state), where with `session_rows` (a bool tree marking the lazy leaves) the gradients of those leaves hold only
the rows `rows_U` (`batch_rows`); without, gradients are dense and `rows_U` is ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

B1, B2 = 0.9, 0.999  # AdamW's betas (optax's and PyTorch's defaults, the original's)


@dataclasses.dataclass(frozen=True)
class Optimizer:
  init: Callable[[Any], Any]
  step: Callable[..., tuple[Any, Any]]  # (grads, state, params, rows_U) -> (new params, new state)
  session_rows: Any = None  # bool tree: leaves whose gradients hold only the batch's rows; None: all dense


def learning_rate_schedule(training_cfg) -> optax.Schedule:
  """Linear warmup from 0 over `warmup_fraction` of the steps, then cosine decay to 0 (one-cycle)."""
  total = max(int(training_cfg.num_steps), 1)
  warmup = max(int(training_cfg.warmup_fraction * total), 1)
  return optax.warmup_cosine_decay_schedule(0.0, training_cfg.learning_rate, warmup_steps=warmup,
                                            decay_steps=max(total, warmup + 1), end_value=0.0)


def session_leaves(params, model_cfg, num_sessions: int):
  """A bool tree like `params`, True at the family's SESSION_PARAMS leaves with one row per session (a stitcher
  shared by all sessions, [1, ...], is not); None when the family does not allow sparse rows or nothing is."""
  from ibl_jax import models  # pylint: disable=g-import-not-at-top
  family = models.of(model_cfg)
  if not getattr(family, "SPARSE_SESSION_ROWS", False) or num_sessions < 2:
    return None
  names = family.SESSION_PARAMS
  rows = {k: jax.tree.map(lambda x, k=k: k in names and x.shape[:1] == (num_sessions,), v) for k, v in params.items()}
  return rows if any(jax.tree.leaves(rows)) else None


def batch_rows(session_idx_B: jax.Array, num_sessions: int) -> tuple[jax.Array, jax.Array]:
  """(rows_U, local_idx_B): the batch's sessions, each once, in U = min(B, S) slots; each trial's slot.

  B < S: the sessions in ascending order, padded with `num_sessions` (out of range: gathers give zeros, scatters
  drop it). B >= S: every session has a slot, its own: slot s holds s when the batch has session s, else
  `num_sessions`; the trials keep their indices, and cutting the tables to the rows is the identity (`_take`),
  so a step with few sessions sorts, searches and copies nothing."""
  session_idx_B = jnp.asarray(session_idx_B, jnp.int32)
  if num_sessions <= session_idx_B.shape[0]:
    present_S = jnp.zeros([num_sessions], bool).at[session_idx_B].set(True)
    return jnp.where(present_S, jnp.arange(num_sessions, dtype=jnp.int32), num_sessions), session_idx_B
  rows_U = jnp.unique(session_idx_B, size=session_idx_B.shape[0], fill_value=num_sessions)
  return rows_U, jnp.searchsorted(rows_U, session_idx_B).astype(jnp.int32)


def _every_row(x, rows_U) -> bool:
  """Whether rows_U has one slot per row of x (B >= S in `batch_rows`): slot s is row s or absent."""
  return rows_U.shape[0] == x.shape[0]


def _take(x, rows_U):
  """x's rows at rows_U, zeros at absent slots; with a slot per row, x itself (absent rows keep their values:
  no trial reads them, so their gradients are zero, and `_put` leaves them as they were)."""
  if _every_row(x, rows_U):
    return x
  return jnp.take(x, rows_U, axis=0, mode="fill", fill_value=0)


def _put(x, rows_U, x_U):
  """x with its rows at rows_U replaced by x_U's; absent slots change nothing."""
  x_U = x_U.astype(x.dtype)
  if _every_row(x, rows_U):
    present = (rows_U < x.shape[0]).reshape(rows_U.shape + (1,) * (x.ndim - 1))
    return jnp.where(present, x_U, x)
  return x.at[rows_U].set(x_U, mode="drop")  # in place (donated buffers)


def take_rows(params, session_rows, rows_U):
  """`params` with each lazy leaf cut to the rows `rows_U` ([U, ...]); what a sparse train step differentiates."""
  return jax.tree.map(lambda p, s: _take(p, rows_U) if s else p, params, session_rows)


def make_optimizer(training_cfg, *, trainable=None, session_rows=None) -> Optimizer:
  """AdamW with clipping. `trainable` (a bool tree like the params) freezes the leaves marked False;
  `session_rows` (`session_leaves`) marks the per-session leaves updated lazily (not with `trainable`:
  fine-tuning runs on a few sessions)."""
  if session_rows is not None and trainable is None:
    return _lazy_session_adamw(training_cfg, session_rows)
  tx = optax.chain(
      optax.clip_by_global_norm(training_cfg.grad_clip_norm),
      optax.adamw(learning_rate_schedule(training_cfg), b1=B1, b2=B2, eps=training_cfg.adam_eps,
                  weight_decay=training_cfg.weight_decay))
  if trainable is not None:
    labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)

  def step(grads, state, params, rows_U=None):
    del rows_U
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return Optimizer(init=tx.init, step=step)


class LazyAdamWState(NamedTuple):
  count: jax.Array  # steps taken: the learning-rate schedule's clock, and the Adam count of shared leaves
  mu: Any  # first moments, like the params
  nu: Any  # second moments
  row_count: Any  # per-session leaves: [S] int32 steps in which the row's session was in a batch; others: []


def state_session_rows(state, session_rows):
  """`session_rows` carried over to an optimiser state of `make_optimizer` (its moments are row tables too),
  for `parallel.param_shardings`; None when the state is not the lazy one."""
  if session_rows is None or not isinstance(state, LazyAdamWState):
    return None
  return LazyAdamWState(False, session_rows, session_rows, session_rows)


def _adamw(g, m, v, p, t, lr, eps, weight_decay):
  """One AdamW update of (param, moments) at Adam step t (1-based, broadcastable); as optax.adamw."""
  m = B1 * m + (1 - B1) * g
  v = B2 * v + (1 - B2) * g * g
  direction = (m / (1 - B1 ** t)) / (jnp.sqrt(v / (1 - B2 ** t)) + eps)
  return p - lr * (direction + weight_decay * p), m, v


def _lazy_session_adamw(training_cfg, session_rows) -> Optimizer:
  schedule = learning_rate_schedule(training_cfg)
  clip, eps, wd = training_cfg.grad_clip_norm, training_cfg.adam_eps, training_cfg.weight_decay

  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    row_count = jax.tree.map(lambda p, s: jnp.zeros(p.shape[:1] if s else (), jnp.int32), params, session_rows)
    return LazyAdamWState(jnp.zeros([], jnp.int32), zeros(), zeros(), row_count)

  def step(grads, state, params, rows_U):
    # Clipping by the global norm: absent rows' gradients are zero, so the batch's rows give the whole norm.
    norm = optax.global_norm(grads)
    scale = jnp.where(norm < clip, 1.0, clip / norm)
    lr = schedule(state.count)
    t = state.count + 1

    def leaf(g, m, v, p, n, s):
      if not s:
        p, m, v = _adamw(g * scale, m, v, p, t, lr, eps, wd)
        return p, m, v, n
      t_U = _take(n, rows_U) + 1
      t_Ux1 = t_U.reshape(t_U.shape + (1,) * (p.ndim - 1))
      p_U, m_U, v_U = _adamw(g * scale, _take(m, rows_U), _take(v, rows_U), _take(p, rows_U), t_Ux1, lr, eps, wd)
      return _put(p, rows_U, p_U), _put(m, rows_U, m_U), _put(v, rows_U, v_U), _put(n, rows_U, t_U)

    out = jax.tree.map(leaf, grads, state.mu, state.nu, params, state.row_count, session_rows)
    pick = lambda i: jax.tree.map(lambda _, o: o[i], params, out)
    return pick(0), LazyAdamWState(t, pick(1), pick(2), pick(3))

  return Optimizer(init=init, step=step, session_rows=session_rows)
