"""Lazy per-session AdamW (ibl_jax/optim.py) against optax's AdamW and against hand-computed updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
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


ROWS = {"stitch_in": {"kernel": True}, "layer": {"kernel": False}, "embed_pos": {"embedding": False}}


def test_session_leaves_mark_only_the_family_s_per_session_leaves():
  cfg = config_dict.ConfigDict({"name": "ndt1"})
  params = {"stitch_in": {"kernel": np.zeros((3, 4, 5))}, "stitch_out": {"bias": np.zeros((3, 4))},
            "embed_session": {"embedding": np.zeros((3, 8))}, "embed_pos": {"embedding": np.zeros((3, 5))}}
  assert optim.session_leaves(params, cfg, 3) == {"stitch_in": {"kernel": True}, "stitch_out": {"bias": True},
                                                  "embed_session": {"embedding": True},
                                                  "embed_pos": {"embedding": False}}  # S rows, but shared
  assert optim.session_leaves(params, cfg, 1) is None  # one session: nothing to skip
  params["stitch_in"]["kernel"] = np.zeros((1, 4, 5))  # stitching off: one stitcher for every session
  assert not optim.session_leaves(params, cfg, 3)["stitch_in"]["kernel"]
  assert optim.session_leaves(params, config_dict.ConfigDict({"name": "ndt2"}), 3) is None  # NDT2 opts out


def test_batch_rows_lists_each_session_once_and_reindexes_the_trials():
  rows_U, local_B = optim.batch_rows(jnp.array([5, 2, 5, 7], jnp.int32), 9)
  np.testing.assert_array_equal(rows_U, [2, 5, 7, 9])  # padded with S = 9
  np.testing.assert_array_equal(local_B, [1, 0, 1, 2])
  # B >= S: a slot per session, its own (S where absent), and the trials keep their indices
  rows_U, local_B = optim.batch_rows(jnp.array([2, 0, 2, 2, 0], jnp.int32), 3)
  np.testing.assert_array_equal(rows_U, [0, 3, 2])
  np.testing.assert_array_equal(local_B, [2, 0, 2, 2, 0])
  table = jnp.arange(6.0).reshape(3, 2)
  assert optim.take_rows({"w": table}, {"w": True}, rows_U)["w"] is table  # nothing gathered


def _rows(grads, session_idx_B):
  """What a sparse train step hands the optimiser: the lazy leaves' gradients at the batch's rows."""
  rows_U, _ = optim.batch_rows(session_idx_B, grads["stitch_in"]["kernel"].shape[0])
  return optim.take_rows(grads, ROWS, rows_U), rows_U


def test_lazy_equals_optax_adamw_when_every_session_is_in_every_batch():
  rng = np.random.default_rng(1)
  params = _params(rng)
  cfg = _training(clip=3.0)
  lazy, dense = optim.make_optimizer(cfg, session_rows=ROWS), optim.make_optimizer(cfg)
  p_lazy, p_dense = params, params
  s_lazy, s_dense = lazy.init(params), dense.init(params)
  session_idx_B = jnp.array([2, 0, 1, 0], jnp.int32)
  for i in range(4):
    grads = jax.tree.map(lambda x: (rng.standard_normal(x.shape) * (5.0 if i == 1 else 0.3)).astype(np.float32),
                         params)  # step 1 is clipped
    p_lazy, s_lazy = jax.jit(lazy.step)(*_rows(grads, session_idx_B)[:1], s_lazy, p_lazy,
                                        _rows(grads, session_idx_B)[1])
    p_dense, s_dense = jax.jit(dense.step)(grads, s_dense, p_dense)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), p_lazy, p_dense)
  np.testing.assert_array_equal(s_lazy.row_count["stitch_in"]["kernel"], [4, 4, 4])


@pytest.mark.parametrize("S", [3, 5])  # B = 4 >= S: a slot per session; B < S: the batch's sessions gathered
def test_absent_session_rows_stay_and_a_late_row_takes_a_first_adam_step(S):
  rng = np.random.default_rng(2)
  params = _params(rng, S)
  cfg = _training(clip=1e6)  # no clipping: the update is checked by hand
  opt = optim.make_optimizer(cfg, session_rows=ROWS)
  step = jax.jit(opt.step)
  state, p = opt.init(params), params
  for _ in range(3):  # session 2 is never in these batches
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    grads, rows_U = _rows(grads, jnp.array([0, 1, 1, 0], jnp.int32))
    p, state = step(grads, state, p, rows_U)
  np.testing.assert_array_equal(p["stitch_in"]["kernel"][2:], params["stitch_in"]["kernel"][2:])  # no decay either
  np.testing.assert_array_equal(state.mu["stitch_in"]["kernel"][2:], 0.0)
  np.testing.assert_array_equal(state.row_count["stitch_in"]["kernel"], [3, 3] + [0] * (S - 2))
  assert not np.allclose(p["embed_pos"]["embedding"][2], params["embed_pos"]["embedding"][2])  # shared: dense

  g = jnp.asarray(rng.standard_normal((S, 4, 5)), jnp.float32)
  grads = jax.tree.map(jnp.zeros_like, params)
  grads["stitch_in"]["kernel"] = g
  before = np.asarray(p["stitch_in"]["kernel"][2])
  grads, rows_U = _rows(grads, jnp.array([2, 2, 0, 1], jnp.int32))
  p, state = step(grads, state, p, rows_U)
  # Its first Adam step (bias-corrected by its own count, 1): m^/sqrt(v^) = g/|g|, at the 4th step's rate.
  lr = optim.learning_rate_schedule(cfg)(3)
  want = before - lr * (np.asarray(g[2]) / (np.abs(np.asarray(g[2])) + 1e-8) + 0.01 * before)
  np.testing.assert_allclose(p["stitch_in"]["kernel"][2], want, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(state.row_count["stitch_in"]["kernel"], [4, 4, 1] + [0] * (S - 3))


def test_sparse_train_step_of_ndt1_equals_the_dense_one_when_every_session_is_in_the_batch():
  from conftest import load_config_module  # pylint: disable=import-outside-toplevel
  from ibl_jax import steps as steps_lib  # pylint: disable=import-outside-toplevel
  c = load_config_module("ndt1").get_config()
  m = c.model
  m.n_channels, m.hidden_size, m.num_layers, m.num_heads, m.mlp_size = 8, 8, 1, 2, 16
  c.masking.scheme = "neuron"
  graphdef, params = steps_lib.split_params(steps_lib.build_model(m, num_sessions=3, n_max=6, seed=0))
  rows = optim.session_leaves(params, m, 3)
  assert rows["stitch_in"]["kernel"] and rows["stitch_out"]["bias"] and not rows["embed_pos"]["embedding"]
  sparse = steps_lib.Steps(graphdef=graphdef, tx=optim.make_optimizer(c.training, session_rows=rows),
                           masking_cfg=c.masking)
  dense = steps_lib.Steps(graphdef=graphdef, tx=optim.make_optimizer(c.training), masking_cfg=c.masking)
  rng = np.random.default_rng(0)
  batch = {"spikes": rng.poisson(1.0, (4, 10, 6)).astype(np.uint8), "time_mask": np.ones((4, 10), bool),
           "neuron_mask": np.ones((4, 6), bool), "neuron_regions": np.zeros((4, 6), np.int32),
           "session_idx": np.array([2, 0, 1, 2], np.int32)}
  out = {}
  for name, s in (("sparse", sparse), ("dense", dense)):
    p, o = params, s.tx.init(params)
    for i in range(3):
      p, o, metrics = jax.jit(s.train_step)(p, o, batch, jnp.int32(i), jax.random.key(1))
    out[name] = (p, metrics)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), out["sparse"][0], out["dense"][0])
  np.testing.assert_allclose(out["sparse"][1]["grad_norm"], out["dense"][1]["grad_norm"], rtol=1e-5)
  # A batch without session 1: the sparse step leaves its rows exactly as they were.
  batch["session_idx"] = np.array([2, 0, 0, 2], np.int32)
  p, o = params, sparse.tx.init(params)
  for i in range(2):  # the first step's learning rate is 0 (warm-up)
    p, o, _ = jax.jit(sparse.train_step)(p, o, batch, jnp.int32(i), jax.random.key(1))
  np.testing.assert_array_equal(p["stitch_in"]["kernel"][1], params["stitch_in"]["kernel"][1])
  assert not np.array_equal(p["stitch_in"]["kernel"][0], params["stitch_in"]["kernel"][0])
