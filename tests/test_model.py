"""Tests of the NDT1 model: shapes, masking semantics, stitching, compilation, dropout, golden parity."""

import re
from pathlib import Path

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ibl_jax import configs
from ibl_jax.errors import UserError
from ibl_jax.models import layers, looped_attention, ndt1

FIXTURE = Path(__file__).resolve().parent / "testdata" / "mtm_ndt1_small"  # a copy of the shared mtm_ndt1_small fixture
B, T, N = 3, 12, 10


def _get_config():
  return configs.get_config("ndt1")


def tiny_cfg(**overrides):
  cfg = _get_config().model
  cfg.update(n_channels=8, hidden_size=16, num_layers=2, num_heads=2, mlp_size=32, max_bins=16)
  cfg.update(overrides)
  return cfg


def make_model(cfg, num_sessions=3, n_max=N, seed=0):
  return ndt1.NDT1(cfg, num_sessions=num_sessions, n_max=n_max, rngs=nnx.Rngs(seed))


@nnx.jit(static_argnames="deterministic")
def apply(model, spikes, time_mask, session_idx, prompt_idx, causal, deterministic=True, rngs=None):
  """The model's forward pass, compiled (eager op-by-op dispatch is slower on CPU)."""
  return model(spikes, time_mask, session_idx, prompt_idx, causal, deterministic=deterministic, rngs=rngs)


def make_inputs(seed=0, b=B):
  spikes_BxTxN = jnp.asarray(np.random.default_rng(seed).poisson(1.0, (b, T, N)), jnp.float32)
  time_mask_BxT = jnp.ones((b, T), bool)
  return spikes_BxTxN, time_mask_BxT, jnp.arange(b) % 3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_output_shape_dtype_and_mixed_precision(dtype):
  spikes, time_mask, session_idx = make_inputs()
  model = make_model(tiny_cfg(dtype=dtype))
  out = apply(model, spikes, time_mask, session_idx, 0, False)
  assert out.shape == (B, T, N) and out.dtype == jnp.float32
  assert jnp.isfinite(out).all()
  _, state = nnx.split(model)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state)), "params must stay float32"
  if dtype == "bfloat16":  # same init: bf16 compute must stay close to the float32 reference
    ref = apply(make_model(tiny_cfg()), spikes, time_mask, session_idx, 0, False)
    np.testing.assert_allclose(out, ref, atol=0.1)


@pytest.mark.parametrize("position,norm", [("learned", "layernorm"), ("rope", "scalenorm")])
def test_causality(position, norm):
  t = 5
  spikes, time_mask, session_idx = make_inputs()
  later = spikes.at[:, t + 1 :].add(3.0)

  def changed_before_t(causal_prefix, causal):
    model = make_model(tiny_cfg(position=position, norm=norm, causal_prefix=causal_prefix))
    run = lambda x: apply(model, x, time_mask, session_idx, 1, causal)
    return float(jnp.abs(run(spikes)[:, : t + 1] - run(later)[:, : t + 1]).max())

  assert changed_before_t("strict", True) < 1e-6
  assert changed_before_t("strict", False) > 1e-3
  # The original lets later bins reach earlier ones through the prefix tokens (bin -> prefix -> bin).
  assert changed_before_t("original", True) > 1e-3


@pytest.mark.parametrize("causal", [False, True])
def test_padded_bins_are_invisible(causal):
  spikes, time_mask, session_idx = make_inputs()
  time_mask = time_mask.at[1, 9:].set(False)
  model = make_model(tiny_cfg())
  out = np.asarray(apply(model, spikes, time_mask, session_idx, 0, causal))
  out_perturbed = np.asarray(apply(model, spikes.at[1, 9:].add(5.0), time_mask, session_idx, 0, causal))
  np.testing.assert_allclose(out_perturbed[:, :9], out[:, :9], atol=1e-6)
  np.testing.assert_allclose(out_perturbed[[0, 2]], out[[0, 2]], atol=1e-6)


def test_stitching_mixed_batch_and_gradients():
  spikes, time_mask, _ = make_inputs()
  session_idx = jnp.array([0, 2, 0])
  model = make_model(tiny_cfg())
  out = apply(model, spikes, time_mask, session_idx, 2, False)
  for b in range(B):
    alone = apply(model, spikes[b : b + 1], time_mask[b : b + 1], session_idx[b : b + 1], 2, False)
    np.testing.assert_allclose(out[b], alone[0], atol=1e-5)

  graphdef, params = nnx.split(model)
  loss = lambda p: nnx.merge(graphdef, p)(spikes, time_mask, session_idx, 2, False).sum()
  grads = jax.jit(jax.grad(loss))(params)
  for row in (grads.stitch_in.kernel, grads.stitch_in.bias, grads.stitch_out.kernel, grads.stitch_out.bias,
              grads.embed_session.embedding):
    assert (row[...][1] == 0).all(), "an absent session's rows must get exactly zero gradient"
    assert (row[...][0] != 0).any() and (row[...][2] != 0).any()


def test_no_stitching_shares_one_layer():
  model = make_model(tiny_cfg(stitching=False))
  assert model.stitch_in.kernel.shape == (1, N, 8) and model.stitch_out.kernel.shape == (1, 16, N)
  spikes, time_mask, _ = make_inputs()
  out = apply(model, spikes, time_mask, jnp.array([0, 1, 2]), 0, False)  # session index only picks the token
  assert jnp.isfinite(out).all()


def test_optional_tokens_and_embedding_switches():
  cfg = tiny_cfg(use_prompt=False, use_session=False, position="rope", embed_act="identity",
                 gelu_approximate=True)
  model = make_model(cfg)
  assert model.num_prefix == 0
  assert model.embed_prompt is None and model.embed_session is None and model.embed_pos is None
  spikes, time_mask, session_idx = make_inputs()
  out = apply(model, spikes, time_mask, session_idx, 0, True)
  assert out.shape == (B, T, N) and jnp.isfinite(out).all()


def test_causal_and_prompt_do_not_recompile():
  spikes, time_mask, session_idx = make_inputs()
  graphdef, params = nnx.split(make_model(tiny_cfg()))
  traces = []

  @jax.jit
  def forward(params, prompt_idx, causal):
    traces.append(1)
    return nnx.merge(graphdef, params)(spikes, time_mask, session_idx, prompt_idx, causal)

  outs = [forward(params, jnp.int32(p), jnp.bool_(c)) for p in range(4) for c in (False, True)]
  assert len(traces) == 1
  assert float(jnp.abs(outs[0] - outs[1]).max()) > 1e-3  # causal changed the result
  assert float(jnp.abs(outs[0] - outs[2]).max()) > 1e-4  # so did the prompt


def test_state_is_params_only_and_dropout_uses_call_rngs():
  model = make_model(tiny_cfg(dropout=0.4, attention_dropout=0.4, embed_dropout=0.2))  # the paper's rates
  _, state = nnx.split(model)
  assert all(isinstance(v, nnx.Param) for _, v in nnx.to_flat_state(state))
  spikes, time_mask, session_idx = make_inputs()
  run = lambda **kw: apply(model, spikes, time_mask, session_idx, 0, False, **kw)
  np.testing.assert_array_equal(run(), run(deterministic=True))
  a = run(deterministic=False, rngs=nnx.Rngs(dropout=1))
  b = run(deterministic=False, rngs=nnx.Rngs(dropout=2))
  assert float(jnp.abs(a - b).max()) > 1e-3
  np.testing.assert_array_equal(a, run(deterministic=False, rngs=nnx.Rngs(dropout=1)))
  with pytest.raises(ValueError, match="rngs"):
    run(deterministic=False)


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_attention_paths_agree(dtype, atol):
  kq, kk, kv, km = jax.random.split(jax.random.key(0), 4)
  shape = (2, 7, 3, 4)
  q, k, v = (jax.random.normal(key, shape).astype(dtype) for key in (kq, kk, kv))
  mask_BxLxL = jax.random.bernoulli(km, 0.5, (2, 7, 7)) | jnp.eye(7, dtype=bool)
  fast = jax.nn.dot_product_attention(q, k, v, mask=mask_BxLxL[:, None])
  explicit = layers.explicit_attention(q, k, v, mask_BxLxL)
  np.testing.assert_allclose(fast.astype(jnp.float32), explicit.astype(jnp.float32), atol=atol)


def test_attention_impl_is_checked_and_the_accelerator_branch_equals_the_cpu_paths(monkeypatch):
  cfg = _get_config().model
  build = lambda impl, dtype: layers.Attention(16, 4, dropout=0.0, attention_dropout=0.0, use_rope=False,
                                               dtype=dtype, rngs=nnx.Rngs(0), accelerator_impl=impl)
  with pytest.raises(UserError, match="model.attention_impl 'flash'"):
    build("flash", jnp.float32)
  with pytest.raises(UserError, match="bfloat16"):
    build("cudnn", jnp.float32)  # cuDNN's fused attention has no float32 kernel
  assert cfg.attention_impl == "xla"
  # The accelerator branch, run here through XLA's implementation, against the CPU's explicit path.
  attn = build("xla", jnp.float32)
  x_BxLxD = jax.random.normal(jax.random.key(1), (2, 7, 16))
  mask_BxLxL = jax.random.bernoulli(jax.random.key(2), 0.5, (2, 7, 7)) | jnp.eye(7, dtype=bool)
  on_cpu = attn(x_BxLxD, mask_BxLxL, None, deterministic=True, rngs=None)
  monkeypatch.setattr(layers, "on_cpu", lambda: False)
  on_accelerator = attn(x_BxLxD, mask_BxLxL, None, deterministic=True, rngs=None)
  np.testing.assert_allclose(on_accelerator, on_cpu, atol=1e-6)


def test_flops_per_trial_matches_xla_count():
  cfg = _get_config().model
  model = make_model(cfg, n_max=80)
  graphdef, params = nnx.split(model)
  forward = lambda p, x, m: nnx.merge(graphdef, p)(x, m, jnp.zeros(1, jnp.int32), 0, True)
  args = (params, jnp.zeros((1, 100, 80)), jnp.ones((1, 100), bool))
  cost = jax.jit(forward).lower(*args).compile().cost_analysis()
  xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
  ours = ndt1.flops_per_trial(cfg, 100, 80)
  assert ours <= xla_flops <= 1.25 * ours  # XLA also counts element-wise ops


# --- golden parity with the original PyTorch NDT1 (fixture: tests/testdata/mtm_ndt1_small) ---------------

MODES = ["neuron", "causal", "inter-region", "intra-region"]


def fixture_cfg():
  cfg = _get_config().model
  cfg.update(n_channels=48, embed_mult=2, hidden_size=64, num_layers=2, num_heads=4, mlp_size=128,
             max_bins=100, num_prompts=4, causal_prefix="original")
  return cfg


@pytest.fixture(scope="module")
def golden():
  assert (FIXTURE / "state_dict.npz").exists() and (FIXTURE / "io.npz").exists(), f"missing {FIXTURE}"
  return dict(np.load(FIXTURE / "state_dict.npz")), dict(np.load(FIXTURE / "io.npz"))


def test_attention_mask_matches_original(golden):
  _, io = golden
  time_mask_BxT = io["time_attn_mask_N37"].astype(bool)
  for mode in MODES:
    ours = ndt1.attention_mask(time_mask_BxT, 2, mode == "causal", "original")
    np.testing.assert_array_equal(ours, io[f"attn_mask_{mode}"].astype(bool), err_msg=mode)


def test_golden_parity_with_torch(golden):
  state_dict, io = golden
  cfg = fixture_cfg()
  model = make_model(cfg, num_sessions=2, n_max=52)
  nnx.update(model, ndt1.params_from_torch_state_dict(state_dict, cfg, ["37", "52"], [0, 1]))
  worst = {}
  for session, n in enumerate(io["num_neurons"]):
    time_mask_BxT = io[f"time_attn_mask_N{n}"].astype(bool)
    session_idx_B = jnp.full((3,), session)
    cases = [(f"N{n}_{mode}", f"spikes_N{n}", p, mode == "causal") for p, mode in enumerate(MODES)]
    cases.append((f"N{n}_neuron_heldout", f"spikes_N{n}_heldout", 0, False))
    for name, spikes_key, prompt, causal in cases:
      spikes_BxTxN = np.pad(io[spikes_key], ((0, 0), (0, 0), (0, 52 - n)))  # padded neurons are zero
      out = apply(model, spikes_BxTxN, time_mask_BxT, session_idx_B, prompt, causal)
      worst[name] = float(np.abs(np.asarray(out)[..., :n] - io[f"preds_{name}"]).max())
  print("parity max|diff|:", worst)
  assert max(worst.values()) < 1e-4, worst


def test_state_dict_mapping_reports_problems(golden):
  state_dict, _ = golden
  broken = dict(state_dict)
  del broken["encoder.layers.1.attn.key.bias"]
  broken["encoder.extra.weight"] = np.zeros(3, np.float32)
  broken["encoder.out_norm.weight"] = np.zeros(65, np.float32)
  with pytest.raises(ValueError) as error:
    ndt1.params_from_torch_state_dict(broken, fixture_cfg(), ["37", "52"], [0, 1])
  message = str(error.value)
  assert "missing encoder.layers.1.attn.key.bias" in message
  assert "unmapped encoder.extra.weight" in message
  assert "out_norm/scale" in message and "decoder.0" not in message


def test_log_rate_bias_starts_each_neuron_at_its_mean_rate():
  """Session 0: 2 neurons (one silent), session 1: 3 neurons; n_max 4. Values by hand: log(mean), floored."""
  from ibl_jax import models  # pylint: disable=g-import-not-at-top
  bias_SxN = models.log_rate_bias([np.array([0.5, 0.0]), np.array([0.1, 2.0, 1.0])], n_max=4, floor=1e-4)
  want = np.log([[0.5, 1e-4, 1e-4, 1e-4], [0.1, 2.0, 1.0, 1e-4]])
  np.testing.assert_allclose(bias_SxN, want, rtol=1e-6)

  cfg = tiny_cfg()
  _, params = nnx.split(make_model(cfg, num_sessions=2, n_max=4))
  params = nnx.to_pure_dict(params)
  out = models.set_log_rate_bias(cfg, params, bias_SxN)
  np.testing.assert_allclose(out["stitch_out"]["bias"], want, rtol=1e-6)
  # Only that leaf changes, and the input tree is left as it was.
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), params, out)
  assert sum(jax.tree.leaves(changed)) == 1
  assert not np.array_equal(params["stitch_out"]["bias"], out["stitch_out"]["bias"])
  # With every session offset by the bias and zero weights after the norm, the model predicts the mean rates.
  zeroed = jax.tree.map(lambda x: x, out)
  zeroed["stitch_out"]["kernel"] = np.zeros_like(out["stitch_out"]["kernel"])
  model = nnx.merge(nnx.graphdef(make_model(cfg, num_sessions=2, n_max=4)), nnx.State(zeroed))
  log_rates = apply(model, jnp.ones((2, 5, 4)), jnp.ones((2, 5), bool), jnp.array([1, 0]), 0, False)
  np.testing.assert_allclose(np.exp(log_rates[0, :, :3]), np.broadcast_to([0.1, 2.0, 1.0], (5, 3)), rtol=1e-5)
  # One shared row (no stitching): nothing to set per session.
  shared = nnx.to_pure_dict(nnx.split(make_model(tiny_cfg(stitching=False), num_sessions=2, n_max=4))[1])
  assert models.set_log_rate_bias(tiny_cfg(stitching=False), shared, bias_SxN) is shared


# materialize_grad: the boundary in the backward pass (its gradient program); materialize: in the forward pass.
@pytest.mark.parametrize("boundary, program", [("materialize_grad", lambda f: jax.grad(f)), ("materialize", lambda f: f)])
def test_materialize_is_an_identity_with_a_fusion_boundary(boundary, program):
  # The predicate's operand: a replicated scalar (in the model a parameter's element), not the batch-split
  # gradient. It must be a runtime value: XLA folds a conditional on a constant away.
  anchor = jnp.float32(0.5)
  x = jnp.linspace(-2.0, 2.0, 24).reshape(2, 3, 4)
  plain = lambda x, a: jnp.sum(jnp.tanh(3.0 * x) ** 2 * x)
  marked = lambda x, a: plain(getattr(layers, boundary)(x, a), a)
  np.testing.assert_array_equal(marked(x, anchor), plain(x, anchor))
  np.testing.assert_array_equal(jax.grad(marked)(x, anchor), jax.grad(plain)(x, anchor))
  compiled = jax.jit(program(marked)).lower(x, anchor).compile().as_text()
  assert "conditional" in compiled  # on a CPU: XLA cannot fuse across it


@pytest.mark.parametrize("tokens,boundaries", [(layers.MIN_TOKENS_FORWARD_BOUNDARY - 1, 0),
                                               (layers.MIN_TOKENS_FORWARD_BOUNDARY, 2)])
def test_encoder_layer_bounds_its_forward_fusions_over_long_sequences_only(tokens, boundaries, monkeypatch):
  # Two boundaries a layer on a CPU from MIN_TOKENS_FORWARD_BOUNDARY tokens (the second norm's output and the
  # layer's output), none below; the values are the layer's without them.
  graphdef, state = nnx.split(layers.EncoderLayer(tiny_cfg(), dtype=jnp.float32, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(1), (1, tokens, 16))
  mask = jnp.ones((1, tokens, tokens), bool)
  # The parameters as arguments: XLA folds a conditional whose predicate is a constant.
  forward = lambda state, x: nnx.merge(graphdef, state)(x, mask, None, deterministic=True, rngs=None)
  assert jax.jit(forward).lower(state, x).compile().as_text().count(" conditional(") == boundaries
  got = np.asarray(jax.jit(forward)(state, x))
  monkeypatch.setattr(layers, "materialize", lambda x, anchor: x)
  np.testing.assert_allclose(got, np.asarray(jax.jit(forward)(state, x)), rtol=1e-6, atol=1e-6)


def _qkv_mask(shape, dtype=jnp.float32):
  kq, kk, kv, km = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(key, shape).astype(dtype) for key in (kq, kk, kv))
  B, L = shape[:2]
  return q, k, v, jax.random.bernoulli(km, 0.5, (B, L, L)) | jnp.eye(L, dtype=bool)


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_looped_attention_equals_explicit_attention_and_its_gradients(dtype, atol):
  q, k, v, mask_BxLxL = _qkv_mask((2, 9, 3, 4), dtype)
  g = jax.random.normal(jax.random.key(1), q.shape)
  loss = lambda attend: lambda q, k, v: jnp.sum(attend(q, k, v, mask_BxLxL).astype(jnp.float32) * g)
  f32 = lambda x: np.asarray(x.astype(jnp.float32))
  looped = looped_attention.attention(q, k, v, mask_BxLxL)
  assert looped.dtype == dtype
  np.testing.assert_allclose(f32(looped), f32(layers.explicit_attention(q, k, v, mask_BxLxL)), atol=atol)
  got = jax.grad(loss(looped_attention.attention), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(layers.explicit_attention), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(f32(a), f32(b), atol=5 * atol)


def _dot_generals(jaxpr):
  """Every dot_general of a jaxpr and of the jaxprs inside it (loops, calls)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):  # (jax.core's was removed in JAX 0.11)
      yield from _dot_generals(sub)


def test_looped_attention_reads_every_probability_matrix_in_its_stored_layout():
  # A product that reads an [B, L, L] operand transposed (on the left, contracted over its rows) runs 1.7x slower
  # on XLA:CPU (docs/performance.md, row 35), so the backward's dk and dv put the small [B, L, D] operand on the
  # left: [B, L, L] matrices come on the left contracted over keys (their last axis) or on the right over rows.
  B, L, H, D = 2, 9, 3, 4
  q, k, v, mask_BxLxL = _qkv_mask((B, L, H, D))
  loss = lambda q, k, v: jnp.sum(jnp.sin(looped_attention.attention(q, k, v, mask_BxLxL)))
  dots = list(_dot_generals(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr))
  seen = {"left": 0, "right": 0}
  for eqn in dots:
    (contract_lhs, contract_rhs), _ = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars
    if lhs.aval.shape == (B, L, L):
      seen["left"] += 1
      assert tuple(contract_lhs) == (2,), f"an [B, L, L] left operand contracted over axis {contract_lhs}"
    if rhs.aval.shape == (B, L, L):
      seen["right"] += 1
      assert tuple(contract_rhs) == (1,), f"an [B, L, L] right operand contracted over axis {contract_rhs}"
  # Forward p @ v and backward dlogits @ k on the left; the backward's dk = q^T dlogits, dv = dout^T p on the right.
  assert seen == {"left": 2, "right": 2}


def test_looped_attention_drops_the_same_probabilities_forward_and_backward():
  B, L, H = 2, 9, 3
  q, k, v, mask_BxLxL = _qkv_mask((B, L, H, L))  # head size L: the one-hot values below read the probabilities
  rate, key = 0.4, jax.random.key(7)
  looped = lambda q, k, v, m: looped_attention.attention(q, k, v, m, dropout_rate=rate, key=key)
  # Values one-hot in the key: the output row is the (dropped, rescaled) probabilities themselves.
  onehot_BxLxHxL = jnp.broadcast_to(jnp.eye(L)[None, :, None, :], (B, L, H, L))
  probs_BxHxLxL = jnp.transpose(looped(q, k, onehot_BxLxHxL, mask_BxLxL), (0, 2, 1, 3))
  kept_BxHxLxL = probs_BxHxLxL > 0
  real = np.broadcast_to(np.asarray(mask_BxLxL)[:, None], kept_BxHxLxL.shape)
  assert 0.3 < float(1 - kept_BxHxLxL[real].mean()) < 0.5  # about `rate` of the real entries dropped
  # The reference: explicit attention with those entries dropped, differentiated by autodiff.
  reference = lambda q, k, v, m: layers.explicit_attention(q, k, v, m, lambda p: p * kept_BxHxLxL / (1 - rate))
  np.testing.assert_allclose(looped(q, k, v, mask_BxLxL), reference(q, k, v, mask_BxLxL), atol=2e-6)
  loss = lambda attend: lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, mask_BxLxL)))
  got = jax.grad(loss(looped), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_bf16_matmuls_accumulate_in_float32_forward_and_backward():
  rng = np.random.default_rng(0)
  x, w = jnp.asarray(rng.standard_normal((3, 5, 64)), jnp.bfloat16), jnp.asarray(rng.standard_normal((64, 8)), jnp.bfloat16)
  xb, wb = jnp.asarray(rng.standard_normal((3, 5, 64)), jnp.bfloat16), jnp.asarray(rng.standard_normal((3, 64, 8)), jnp.bfloat16)
  f32 = lambda a: a.astype(jnp.float32)
  cases = ((layers.matmul_f32_accumulate, lambda a, b: jnp.einsum("...i,io->...o", f32(a), f32(b)), x, w),
           (layers.batched_matmul_f32_accumulate, lambda a, b: jnp.einsum("bti,bio->bto", f32(a), f32(b)), xb, wb))
  for fn, reference, a, b in cases:
    out = fn(a, b)
    assert out.dtype == (jnp.bfloat16 if fn is layers.matmul_f32_accumulate else jnp.float32)
    np.testing.assert_allclose(f32(out), reference(a, b), rtol=1e-2, atol=1e-2)
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f32(f(a, b))))
    for got, want in zip(jax.grad(loss(fn), argnums=(0, 1))(a, b), jax.grad(loss(reference), argnums=(0, 1))(a, b)):
      assert got.dtype == jnp.bfloat16
      np.testing.assert_allclose(f32(got), f32(want), atol=0.03 * float(jnp.abs(f32(want)).max()))  # bf16 rounding
  dense = layers.linear(64, 8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))  # nnx.Linear takes that path in bf16
  np.testing.assert_allclose(f32(dense(x)), x.astype(jnp.float32) @ f32(dense.kernel[...].astype(jnp.bfloat16))
                             + dense.bias[...], rtol=1e-2, atol=2e-2)


def _dot_operand_dtypes(compiled_hlo: str) -> list[tuple[str, ...]]:
  """The element types of every dot's operands in an optimised HLO module's text."""
  types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", compiled_hlo))
  return [tuple(types[n] for n in re.findall(r"%([\w.\-]+)", ops)) for ops in re.findall(r" dot\(([^)]*)\)", compiled_hlo)]


def test_transposed_swaps_the_last_two_axes_of_bf16_arrays_exactly():
  rng = np.random.default_rng(1)
  for shape in ((5, 3), (4, 7), (2, 3, 6), (2, 1, 5)):  # odd and even row counts, leading axes
    x = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    got = layers.transposed(x)
    assert got.dtype == jnp.bfloat16 and got.shape == shape[:-2] + (shape[-1], shape[-2])
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.swapaxes(np.asarray(x, np.float32), -1, -2))
  x32 = jnp.asarray(rng.standard_normal((2, 3, 5)), jnp.float32)
  np.testing.assert_array_equal(layers.transposed(x32), np.swapaxes(np.asarray(x32), -1, -2))


def test_gelu_is_the_exact_gelu_rounded_once_to_the_input_dtype():
  from scipy import special  # pylint: disable=g-import-not-at-top
  x64 = np.linspace(-9.0, 9.0, 2001)
  want = 0.5 * x64 * special.erfc(-x64 / np.sqrt(2.0))  # float64 reference
  got = layers.gelu(jnp.asarray(x64, jnp.float32), approximate=False)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-6)
  # bf16: rounded once, so within half a bf16 ulp (2^-8 relative) of the exact GELU of the bf16 inputs; rounding
  # each of erf's steps to bf16 (jax.nn.gelu on bf16) misses that by up to several ulps.
  xb = jnp.asarray(x64, jnp.bfloat16)
  got_bf16 = layers.gelu(xb, approximate=False)
  assert got_bf16.dtype == jnp.bfloat16
  xb64 = np.asarray(xb, np.float64)
  np.testing.assert_allclose(np.asarray(got_bf16, np.float64), 0.5 * xb64 * special.erfc(-xb64 / np.sqrt(2.0)),
                             rtol=2**-8 * 1.01, atol=1e-6)
  np.testing.assert_allclose(layers.gelu(jnp.asarray(x64, jnp.float32), approximate=True),
                             jax.nn.gelu(jnp.asarray(x64, jnp.float32), approximate=True), atol=1e-7)


def test_bf16_weight_gradients_run_as_bf16_products_on_cpu():
  # XLA:CPU folded the transpose of autodiff's `x^T g` into the product, then ran it in float32 on Eigen (both
  # operands converted; 6x slower than YNNPACK's bf16 product on AMX, docs/performance.md row 42).
  rng = np.random.default_rng(0)
  bf16 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  cases = ((layers.matmul_f32_accumulate, bf16(2, 9, 40), bf16(40, 24)),
           (layers.batched_matmul_f32_accumulate, bf16(3, 5, 40), bf16(3, 40, 24)))
  for fn, x, w in cases:
    loss = lambda w, x: jnp.sum(fn(x, w).astype(jnp.float32) ** 2)
    dtypes = _dot_operand_dtypes(jax.jit(jax.grad(loss)).lower(w, x).compile().as_text())
    assert len(dtypes) == 2 and all(d == ("bf16", "bf16") for d in dtypes), dtypes


def test_wide_float32_linear_on_cpu_takes_its_weight_gradient_without_a_transpose():
  # Autodiff's weight gradient of `x @ w` made XLA:CPU copy a transposed operand (its YNNPACK dots take none);
  # a wide `layers.linear` contracts x's rows in place instead. Same values as autodiff of the plain product.
  rng = np.random.default_rng(0)
  width = layers.MIN_WIDTH_IN_PLACE_GRAD
  x = jnp.asarray(rng.standard_normal((2, 16, width)), jnp.float32)
  dense = layers.linear(width, width + 8, dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(dense)
  loss = lambda state, x: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)))
  plain = lambda state, x: jnp.sum(jnp.sin(x @ state["kernel"][...] + state["bias"][...]))
  got, want = jax.grad(loss, argnums=(0, 1))(state, x), jax.grad(plain, argnums=(0, 1))(state, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  compiled = jax.jit(jax.grad(loss)).lower(state, x).compile().as_text()
  assert " transpose(" not in compiled
  assert " transpose(" in jax.jit(jax.grad(plain)).lower(state, x).compile().as_text()  # what it replaces
  narrow = layers.linear(width // 2, width, dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert narrow.dot_general is jax.lax.dot_general  # narrow layers keep autodiff's (measured faster there)
