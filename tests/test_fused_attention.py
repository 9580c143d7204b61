"""The fused C++ attention kernel (`ibl_jax/kernels/attention_cpu.cc`) against the pure-JAX attention."""

import logging
import platform
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ibl_jax import kernels
from ibl_jax.models import fused_attention, layers

pytestmark = pytest.mark.skipif(not fused_attention.available(16), reason="no C++ compiler: the kernel is not built")


def _qkv_mask(shape, seed=0):
  kq, kk, kv, km = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(key, shape) for key in (kq, kk, kv))
  B, L = shape[:2]
  return q, k, v, jax.random.bernoulli(km, 0.3, (B, L, L)) | jnp.eye(L, dtype=bool)


# L = 37: query rows in blocks of 4 and one left over, keys in chunks of 16 and a partial one; L = 16: whole;
# L = 45, 64 features: keys two chunks at a time (AVX-512) and a third alone.
@pytest.mark.parametrize("shape", [(2, 37, 3, 16), (3, 16, 2, 32), (1, 45, 2, 64)])
def test_fused_attention_equals_explicit_attention_and_its_gradients(shape):
  q, k, v, mask = _qkv_mask(shape)
  g = jax.random.normal(jax.random.key(1), q.shape)
  loss = lambda attend: lambda q, k, v: jnp.sum(attend(q, k, v, mask) * g)
  np.testing.assert_allclose(jax.jit(fused_attention.attention)(q, k, v, mask),
                             layers.explicit_attention(q, k, v, mask), atol=2e-6)
  got = jax.jit(jax.grad(loss(fused_attention.attention), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(layers.explicit_attention), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_fused_attention_ignores_masked_keys_whatever_their_values():
  q, k, v, _ = _qkv_mask((1, 20, 1, 16))
  mask = jnp.tril(jnp.ones((20, 20), bool))[None]  # causal: query i sees keys 0..i
  out = fused_attention.attention(q, k, v, mask)
  k2, v2 = k.at[:, 10:].set(1e4), v.at[:, 10:].set(-1e4)  # only queries 10.. see these
  out2 = fused_attention.attention(q, k2, v2, mask)
  np.testing.assert_array_equal(out[:, :10], out2[:, :10])
  # Query 0 sees only itself: its output is its own value.
  np.testing.assert_allclose(out[0, 0], v[0, 0], atol=1e-6)


def test_fused_attention_stops_at_each_querys_last_key_and_copies_single_key_rows():
  # NDT2's masks (real tokens first, `ndt2.real_first`): real queries see a prefix of the keys (causal: up to
  # their own time), padded ones only themselves; here trial 0 has 23 real tokens of 37, trial 1 is causal.
  B, L = 2, 37
  q, k, v, _ = _qkv_mask((B, L, 2, 16), seed=3)
  real = np.arange(L)[None, :] < np.array([[23], [37]])
  causal = np.array([np.ones((L, L), bool), np.tril(np.ones((L, L), bool))])
  mask = jnp.asarray((causal & real[:, None, :] & real[:, :, None]) | np.eye(L, dtype=bool))
  g = jax.random.normal(jax.random.key(1), q.shape)
  loss = lambda attend: lambda q, k, v: jnp.sum(attend(q, k, v, mask) * g)
  out = jax.jit(fused_attention.attention)(q, k, v, mask)
  np.testing.assert_allclose(out, layers.explicit_attention(q, k, v, mask), atol=2e-6)
  np.testing.assert_array_equal(out[0, 23:], v[0, 23:])  # a padded query's output is its own value, copied
  got = jax.jit(jax.grad(loss(fused_attention.attention), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(layers.explicit_attention), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # Hand-derived for a row with one key: probability 1, so no gradient to its query or to the keys.
  np.testing.assert_array_equal(got[0][0, 23:], 0.0)
  np.testing.assert_array_equal(got[1][0, 23:], 0.0)
  np.testing.assert_array_equal(got[2][0, 23:], g[0, 23:])  # dv_j = dout_j: only row j reads v_j
  # A query that sees nothing (outside the contract) gets zeros, not NaN, and its batch mates are untouched.
  empty = mask.at[1, 5].set(False)
  out_empty = fused_attention.attention(q, k, v, empty)
  np.testing.assert_array_equal(out_empty[1, 5], 0.0)
  np.testing.assert_array_equal(np.delete(np.asarray(out_empty), 5, axis=1), np.delete(np.asarray(out), 5, axis=1))
  grads = jax.grad(lambda q, k, v: jnp.sum(fused_attention.attention(q, k, v, empty) * g), argnums=(0, 1, 2))(q, k, v)
  assert all(np.isfinite(x).all() for x in grads)
  np.testing.assert_array_equal(grads[0][1, 5], 0.0)


def test_fused_attention_runs_on_each_devices_own_trials(tmp_path):
  # An FFI call is opaque to XLA's partitioner: without custom_partitioning each device would gather the whole
  # batch. Two CPU devices in a child Python: no collective in the compiled step, same values as unsharded.
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      jax.config.update("jax_num_cpu_devices", 2)
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from ibl_jax.models import fused_attention, layers
      mesh = Mesh(np.asarray(jax.devices()).reshape(2, 1), ("data", "fsdp"))
      split = NamedSharding(mesh, P(("data", "fsdp")))
      ks = jax.random.split(jax.random.key(0), 4)
      q, k, v = (jax.random.normal(key, (4, 18, 2, 16)) for key in ks[:3])
      mask = jax.random.bernoulli(ks[3], 0.5, (4, 18, 18)) | jnp.eye(18, dtype=bool)
      loss = lambda attend: lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, mask)))
      step = jax.jit(jax.value_and_grad(loss(fused_attention.attention), argnums=(0, 1, 2)))
      args = [jax.device_put(x, split) for x in (q, k, v)]
      mask = jax.device_put(mask, split)
      text = step.lower(*args).compile().as_text()
      got = step(*args)
      want = jax.value_and_grad(loss(layers.explicit_attention), argnums=(0, 1, 2))(q, k, v)
      err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
      shard = [l for l in text.splitlines() if "ibl_attention_forward" in l][0]
      print("collectives", any(c in text for c in ("all-gather", "all-to-all", "collective-permute")))
      print("per-device", "f32[2,18,2,16]" in shard, "err-ok", err < 1e-5)
  """)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert proc.stdout.split() == ["collectives", "False", "per-device", "True", "err-ok", "True"], proc.stderr[-2000:]


def test_attention_layer_takes_the_kernel_for_long_sequences_without_probability_dropout():
  attention = lambda dropout: layers.Attention(32, 2, dropout=0.0, attention_dropout=dropout, use_rope=False,
                                               dtype=jnp.float32, rngs=nnx.Rngs(0))
  L = fused_attention.MIN_TOKENS
  x = jax.random.normal(jax.random.key(0), (1, L, 32))
  mask = jnp.ones((1, L, L), bool)
  targets_of = lambda fn, x: str(jax.make_jaxpr(fn)(x))
  targets = lambda fn: targets_of(fn, x)
  layer = attention(0.0)
  assert "ibl_attention_forward" in targets(lambda x: layer(x, mask, None, deterministic=False, rngs=None))
  assert "ibl_attention_forward" not in targets(lambda x: layer(x[:, :L // 2], mask[:, :L // 2, :L // 2], None,
                                                                deterministic=True, rngs=None))
  if fused_attention.bf16_forward(32):  # bf16 on AMX: from MIN_TOKENS_AMX tokens
    short = fused_attention.MIN_TOKENS_AMX
    wide = lambda dtype: layers.Attention(64, 2, dropout=0.0, attention_dropout=0.0, use_rope=False, dtype=dtype,
                                          rngs=nnx.Rngs(0))
    x64 = jax.random.normal(jax.random.key(0), (1, short, 64))
    run = lambda layer: lambda x: layer(x, mask[:, :short, :short], None, deterministic=True, rngs=None)
    assert "ibl_attention_forward_bf16" in targets_of(run(wide(jnp.bfloat16)), x64)
    assert "ibl_attention_forward" not in targets_of(run(wide(jnp.float32)), x64)
    assert "ibl_attention_forward" not in targets_of(
        lambda x: wide(jnp.bfloat16)(x[:, :short - 1], mask[:, :short - 1, :short - 1], None, deterministic=True,
                                     rngs=None), x64)
  dropping = attention(0.1)
  assert "ibl_attention_forward" in targets(lambda x: dropping(x, mask, None, deterministic=True, rngs=None))
  assert "ibl_attention_forward" not in targets(lambda x: dropping(x, mask, None, deterministic=False,
                                                              rngs=nnx.Rngs(dropout=1)))


def test_kernel_build_is_cached_and_a_missing_compiler_falls_back_with_one_warning(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("IBL_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
  source = tmp_path / "tiny.cc"
  source.write_text('extern "C" int ibl_answer() { return 42; }\n')
  monkeypatch.setattr(kernels, "HERE", tmp_path)
  kernels.load.cache_clear()
  try:
    lib = kernels.load("tiny")
    assert lib.ibl_answer() == 42
    built = list((tmp_path / "cache").glob("tiny-*.so"))
    assert len(built) == 1  # and no temporary file left behind
    mtime = built[0].stat().st_mtime_ns
    kernels.load.cache_clear()
    assert kernels.load("tiny").ibl_answer() == 42
    assert built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    kernels.load.cache_clear()
    source.write_text("this is not C++\n")
    with caplog.at_level(logging.WARNING, logger="ibl_jax.kernels"):
      assert kernels.load("tiny") is None
    assert "did not build" in caplog.text
    assert len(list((tmp_path / "cache").iterdir())) == 1
    kernels.load.cache_clear()
    monkeypatch.setenv("IBL_JAX_CPU_KERNELS", "0")
    assert kernels.load("tiny") is None
  finally:
    kernels.load.cache_clear()


def _assembly_for(tmp_path, march: str):
  """The kernel compiled to assembly for `-march=march` with the build's other flags: (process, assembly text)."""
  flags = [f for f in kernels._flags() if not f.startswith(("-march", "-mprefer", "-shared"))]
  asm = tmp_path / "attention_cpu.s"
  built = subprocess.run([kernels._compiler(), *flags, f"-march={march}", f"-I{jax.ffi.include_dir()}", "-S",
                          str(kernels.HERE / "attention_cpu.cc"), "-o", str(asm)], capture_output=True, text=True)
  return built, asm.read_text() if built.returncode == 0 else ""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86 target")
def test_kernel_compiled_for_avx2_compares_whole_vectors(tmp_path):
  # GCC turned each comparison of a vector wider than the target's registers (16 floats on AVX2, as on AMD hosts
  # without AVX-512) into a scalar compare and branch per lane: the kernel ran 6x slower there (docs/performance.md,
  # row 43). Its vectors are now the target's width; compiled for AVX2 no scalar float compare is left.
  built, code = _assembly_for(tmp_path, "x86-64-v3")
  assert built.returncode == 0, built.stderr[-2000:]
  assert "ymm" in code and "zmm" not in code  # built for AVX2 indeed
  assert "comiss" not in code  # (v)ucomiss/(v)comiss: a lane compared on its own


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86 target")
def test_kernel_compiled_for_amx_runs_its_bf16_products_on_tiles(tmp_path):
  # Built for a CPU with AMX (any x86 host can compile for one): the bf16 forward's two products are tile
  # products, and the tiles are configured and released.
  built, code = _assembly_for(tmp_path, "sapphirerapids")
  if built.returncode and "sapphirerapids" in built.stderr:
    pytest.skip("this compiler does not know -march=sapphirerapids")
  assert built.returncode == 0, built.stderr[-2000:]
  for instruction in ("tdpbf16ps", "ldtilecfg", "tilerelease", "vcvtneps2bf16"):
    assert instruction in code, instruction


def _bf16_qkv_real_first(B, L, H, D, real, seed=0):
  """bf16 q, k, v and NDT2's masks: trial b's first real[b] tokens see each other, the others only themselves."""
  q, k, v = (x.astype(jnp.bfloat16) * 2 for x in _qkv_mask((B, L, H, D), seed)[:3])
  is_real = np.arange(L)[None, :] < np.asarray(real)[:, None]
  mask = (is_real[:, None, :] & is_real[:, :, None]) | np.eye(L, dtype=bool)
  return q, k, v, jnp.asarray(mask)


# L = 37: two blocks of 16 query rows and one of 5 (trial 1: 23 real rows, 16 + 7); keys in one partial chunk of
# 64. L = 130: keys in two whole chunks of 64 and a partial one of 32.
@pytest.mark.parametrize("shape", [(2, 37, 3, 32), (2, 130, 2, 64)])
def test_bf16_forward_on_amx_equals_float32_attention_of_the_same_values(shape):
  B, L, H, D = shape
  if not fused_attention.bf16_forward(D):
    pytest.skip("no AMX here (or the OS does not grant its tiles)")
  q, k, v, mask = _bf16_qkv_real_first(B, L, H, D, real=[L, L - 14])
  f32 = lambda x: x.astype(jnp.float32)
  out, lse = jax.jit(fused_attention._sharded_forward_bf16)(q, k, v, mask)
  want_out, want_lse = jax.jit(fused_attention._sharded_forward)(f32(q), f32(k), f32(v), mask)
  # Logits: exact bf16 products summed in float32 (in another order): lse to float32 rounding.
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
  # Output: the probabilities rounded to bf16 (relative error 2^-8 each) before P V, the output rounded to bf16.
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(f32(out), want_out, atol=2 ** -7 * float(jnp.abs(f32(v)).max()))
  np.testing.assert_allclose(want_out, layers.explicit_attention(f32(q), f32(k), f32(v), mask), atol=2e-5)
  np.testing.assert_array_equal(out[1, L - 14:], v[1, L - 14:])  # padded queries copy their own value
  # The public entry takes the bf16 path for bf16 inputs, returns bf16, and its gradient is the float32 kernel's.
  text = jax.jit(fused_attention.attention).lower(q, k, v, mask).as_text()
  assert "ibl_attention_forward_bf16" in text
  assert fused_attention.attention(q, k, v, mask).dtype == jnp.bfloat16
  g = jax.random.normal(jax.random.key(1), q.shape)
  loss = lambda attend: lambda q, k, v: jnp.sum(f32(attend(q, k, v, mask)) * g)
  got = jax.jit(jax.grad(loss(fused_attention.attention), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(layers.explicit_attention), argnums=(0, 1, 2))(f32(q), f32(k), f32(v))
  for a, b in zip(got, want):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(f32(a), b, atol=0.05 * float(jnp.abs(b).max()))


def test_bf16_inputs_take_the_float32_kernel_without_amx(monkeypatch):
  q, k, v, mask = _bf16_qkv_real_first(1, 20, 1, 32, real=[15])
  monkeypatch.setenv("IBL_JAX_CPU_AMX", "0")
  fused_attention._amx.cache_clear()
  try:
    assert not fused_attention.bf16_forward(32)
    text = jax.jit(fused_attention.attention).lower(q, k, v, mask).as_text()
    assert "ibl_attention_forward_bf16" not in text and "ibl_attention_forward" in text
    f32 = lambda x: x.astype(jnp.float32)
    np.testing.assert_allclose(f32(fused_attention.attention(q, k, v, mask)),
                               layers.explicit_attention(f32(q), f32(k), f32(v), mask).astype(jnp.bfloat16), atol=1e-2)
  finally:
    fused_attention._amx.cache_clear()
