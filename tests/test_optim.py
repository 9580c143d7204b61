"""Lazy per-session AdamW (ibl_jax/optim.py) against optax's AdamW and against hand-computed updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import config_dict

from ibl_jax import optim


def _training(clip=1.0):
  t = config_dict.ConfigDict()
  t.num_steps, t.warmup_fraction, t.learning_rate = 10, 0.2, 1e-2
  t.grad_clip_norm, t.adam_eps, t.weight_decay = clip, 1e-8, 0.01
  return t


def _params(rng, S=3):
  return {"stitch_in": {"kernel": rng.standard_normal((S, 4, 5)).astype(np.float32)},
          "layer": {"kernel": rng.standard_normal((5, 5)).astype(np.float32)},
          "embed_pos": {"embedding": rng.standard_normal((S, 5)).astype(np.float32)}}  # S rows, but shared


def test_session_leaves_mark_only_named_leaves_with_one_row_per_session():
  params = _params(np.random.default_rng(0))
  rows = optim.session_leaves(params, ("stitch_in", "embed_session"), 3)
  assert rows == {"stitch_in": {"kernel": True}, "layer": {"kernel": False}, "embed_pos": {"embedding": False}}
  assert not any(jax.tree.leaves(optim.session_leaves(params, ("stitch_in",), 1)))  # one session: nothing lazy


def test_lazy_equals_optax_adamw_when_every_session_is_in_every_batch():
  rng = np.random.default_rng(1)
  params = _params(rng)
  cfg = _training(clip=3.0)
  lazy = optim.make_optimizer(cfg, session_rows=optim.session_leaves(params, ("stitch_in",), 3))
  dense = optim.make_optimizer(cfg)
  p_lazy, p_dense = params, params
  s_lazy, s_dense = lazy.init(params), dense.init(params)
  session_idx_B = jnp.array([2, 0, 1, 0], jnp.int32)
  for i in range(4):
    grads = jax.tree.map(lambda x: (rng.standard_normal(x.shape) * (5.0 if i == 1 else 0.3)).astype(np.float32),
                         params)  # step 1 is clipped
    p_lazy, s_lazy = jax.jit(lazy.step)(grads, s_lazy, p_lazy, session_idx_B)
    p_dense, s_dense = jax.jit(dense.step)(grads, s_dense, p_dense, session_idx_B)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), p_lazy, p_dense)
  np.testing.assert_array_equal(s_lazy.row_count["stitch_in"]["kernel"], [4, 4, 4])


def test_absent_session_rows_stay_and_a_late_row_takes_a_first_adam_step():
  rng = np.random.default_rng(2)
  params = _params(rng)
  cfg = _training(clip=1e6)  # no clipping: the update is checked by hand
  opt = optim.make_optimizer(cfg, session_rows=optim.session_leaves(params, ("stitch_in",), 3))
  step = jax.jit(opt.step)
  state, p = opt.init(params), params
  zero_row2 = lambda g: g.at[2].set(0.0)
  for i in range(3):  # session 2 is never in these batches: zero gradient on its row, as autodiff gives
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    grads["stitch_in"]["kernel"] = zero_row2(grads["stitch_in"]["kernel"])
    p, state = step(grads, state, p, jnp.array([0, 1, 1, 0], jnp.int32))
  np.testing.assert_array_equal(p["stitch_in"]["kernel"][2], params["stitch_in"]["kernel"][2])  # no decay either
  np.testing.assert_array_equal(state.mu["stitch_in"]["kernel"][2], 0.0)
  np.testing.assert_array_equal(state.row_count["stitch_in"]["kernel"], [3, 3, 0])
  assert not np.allclose(p["embed_pos"]["embedding"][2], params["embed_pos"]["embedding"][2])  # shared: dense

  g = jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)
  grads = jax.tree.map(jnp.zeros_like, params)
  grads["stitch_in"]["kernel"] = g
  before = np.asarray(p["stitch_in"]["kernel"][2])
  p, state = step(grads, state, p, jnp.array([2, 2, 0, 1], jnp.int32))
  # Its first Adam step (bias-corrected by its own count, 1): m^/sqrt(v^) = g/|g|, at the 4th step's rate.
  lr = optim.learning_rate_schedule(cfg)(3)
  want = before - lr * (np.asarray(g[2]) / (np.abs(np.asarray(g[2])) + 1e-8) + 0.01 * before)
  np.testing.assert_allclose(p["stitch_in"]["kernel"][2], want, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(state.row_count["stitch_in"]["kernel"], [4, 4, 1])
