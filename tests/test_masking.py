"""Masking schemes (ibl_jax/masking.py) on hand-made, mixed-session batches with padding."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibl_jax import configs, masking

NEURON, CAUSAL, INTER, INTRA, TEMPORAL, RANDOM = range(6)

# Three sessions in one batch: trial 0 is session A (8 neurons), trial 1 session B (5 neurons, 3 padded, last
# 2 bins padded), trial 2 all padding (no real neuron), trial 3 session A again with its last bin padded.
REGIONS_A = [10, 10, 11, 11, 11, 12, 12, 12]
REGIONS_B = [13, 13, 14, 11, 11, -1, -1, -1]


def _batch() -> dict[str, np.ndarray]:
  """The 4-trial, 6-bin batch above. Real entries are ≥ 1, so a zeroed input is visible."""
  T = 6
  neuron_mask_BxN = np.array([[1] * 8, [1] * 5 + [0] * 3, [0] * 8, [1] * 8], bool)
  time_mask_BxT = np.array([[1] * T, [1] * (T - 2) + [0] * 2, [1] * T, [1] * (T - 1) + [0]], bool)
  regions_BxN = np.array([REGIONS_A, REGIONS_B, [-1] * 8, REGIONS_A], np.int32)
  rng = np.random.default_rng(0)
  spikes_BxTxN = 1 + rng.poisson(1.0, (4, T, 8))
  valid_BxTxN = time_mask_BxT[:, :, None] & neuron_mask_BxN[:, None, :]
  spikes_BxTxN = np.where(valid_BxTxN, spikes_BxTxN, 0).astype(np.uint8)
  return dict(spikes=spikes_BxTxN, neuron_mask=neuron_mask_BxN, time_mask=time_mask_BxT,
              neuron_regions=regions_BxN, session_idx=np.array([0, 1, 2, 0], np.int32))


def _valid(batch) -> np.ndarray:
  return batch["time_mask"][:, :, None] & batch["neuron_mask"][:, None, :]


_mask = jax.jit(masking.mask_batch)  # ratios are traced too: one compilation serves every test


def _run(seed: int, batch, scheme: int, ratio=0.3, causal_ratio=0.6, zero_ratio=1.0, random_ratio=1.0):
  # Always passing every ratio (traced) keeps a single jit cache entry.
  masked = _mask(jax.random.key(seed), batch, jnp.int32(scheme), ratio=ratio, causal_ratio=causal_ratio,
                 zero_ratio=zero_ratio, random_ratio=random_ratio)
  return jax.tree.map(np.asarray, masked)


def _run_many(seeds, batch, scheme: int, **ratios):
  """Draws once per seed; returns the batch repeated and the draws concatenated along B (for statistics)."""
  draws = [_run(seed, batch, scheme, **ratios) for seed in seeds]
  repeated = {k: np.concatenate([v] * len(draws)) for k, v in batch.items()}
  return repeated, jax.tree.map(lambda *x: np.concatenate(x) if x[0].ndim else np.stack(x), *draws)


def test_scheme_ids_parsing():
  assert masking.scheme_ids("mtm") == (NEURON, CAUSAL, INTER, INTRA)
  assert masking.scheme_ids("all") == masking.scheme_ids("mtm")
  assert masking.scheme_ids("neuron") == (NEURON,)
  assert masking.scheme_ids(" neuron, causal ") == (NEURON, CAUSAL)
  assert masking.scheme_ids(["temporal", "random,neuron", "temporal"]) == (TEMPORAL, RANDOM, NEURON)
  with pytest.raises(ValueError, match="'neurons'"):
    masking.scheme_ids("neuron,neurons")
  with pytest.raises(ValueError, match="no masking scheme"):
    masking.scheme_ids("")


def test_prompt_and_causal_flags():
  batch = _batch()
  for scheme, prompt in enumerate((0, 1, 2, 3, 0, 0)):
    m = _run(0, batch, scheme)
    assert m.prompt_idx == prompt and m.causal == (scheme == CAUSAL) and m.scheme_id == scheme
    assert m.inputs_BxTxN.dtype == np.float32 and m.targets_mask_BxTxN.dtype == bool


def test_padding_is_never_a_target_and_stays_zero():
  batch = _batch()
  valid = _valid(batch)
  for scheme in range(6):
    for seed in range(5):
      m = _run(seed, batch, scheme, zero_ratio=0.0, random_ratio=1.0)  # random counts must not fill padding
      assert not (m.targets_mask_BxTxN & ~valid).any(), masking.SCHEMES[scheme]
      assert (m.inputs_BxTxN[~valid] == 0).all(), masking.SCHEMES[scheme]
      assert np.isfinite(m.inputs_BxTxN).all()
      assert not m.targets_mask_BxTxN[2].any()  # the all-padding trial


def test_inter_region_hides_exactly_one_region_of_the_trial():
  batch = _batch()
  valid = _valid(batch)
  chosen = {0: set(), 1: set(), 3: set()}
  for seed in range(40):
    m = _run(seed, batch, INTER)
    for b in chosen:
      target_N = m.targets_mask_BxTxN[b].any(axis=0)
      regions = set(batch["neuron_regions"][b][target_N])
      assert len(regions) == 1, (seed, b, regions)
      (region,) = regions
      in_region_N = batch["neuron_mask"][b] & (batch["neuron_regions"][b] == region)
      # Every real bin of every neuron of that region, nothing else; exactly those inputs zeroed.
      np.testing.assert_array_equal(m.targets_mask_BxTxN[b], valid[b] & in_region_N[None, :])
      np.testing.assert_array_equal(m.inputs_BxTxN[b] == 0, ~valid[b] | in_region_N[None, :])
      chosen[b].add(int(region))
  # Each trial draws among its own session's regions, and every one of them comes up.
  assert chosen == {0: {10, 11, 12}, 1: {11, 13, 14}, 3: {10, 11, 12}}


def test_inter_region_is_uniform_over_regions_not_neurons():
  batch, m = _run_many(range(150), _batch(), INTER)
  counts = {10: 0, 11: 0, 12: 0}
  for b in np.flatnonzero(batch["session_idx"] == 0):  # session A: regions of 2, 3 and 3 neurons
    target_N = m.targets_mask_BxTxN[b].any(axis=0)
    counts[int(batch["neuron_regions"][b][target_N][0])] += 1
  freq = np.array(list(counts.values())) / sum(counts.values())  # 300 draws; weighting by neurons: .25/.375
  np.testing.assert_allclose(freq, 1 / 3, atol=0.08)


def test_intra_region_targets_only_hidden_neurons_of_its_region():
  batch = _batch()
  valid = _valid(batch)
  for seed in range(40):
    m = _run(seed, batch, INTRA, ratio=0.5, zero_ratio=0.0, random_ratio=0.0)  # inputs of R stay unchanged
    for b in (0, 1, 3):
      kept_N = (m.inputs_BxTxN[b] != 0).any(axis=0)  # neurons still visible: R's neurons that were not hidden
      target_N = m.targets_mask_BxTxN[b].any(axis=0)
      region_N = kept_N | target_N
      regions = set(batch["neuron_regions"][b][region_N])
      assert len(regions) == 1, (seed, b, regions)
      in_region_N = batch["neuron_mask"][b] & (batch["neuron_regions"][b] == regions.pop())
      np.testing.assert_array_equal(region_N, in_region_N)  # R is a whole region of the trial
      # Inputs outside R are zero even though zero_ratio = 0: they are context, not targets.
      assert (m.inputs_BxTxN[b][:, ~in_region_N] == 0).all()
      np.testing.assert_array_equal(m.targets_mask_BxTxN[b], valid[b] & target_N[None, :])
      assert not (target_N & ~in_region_N).any()


def test_neuron_and_temporal_hide_whole_neurons_and_bins():
  batch = _batch()
  valid = _valid(batch)
  for seed in range(10):
    neuron = _run(seed, batch, NEURON).targets_mask_BxTxN
    np.testing.assert_array_equal(neuron, valid & neuron.any(axis=1, keepdims=True))
    for scheme in (TEMPORAL, CAUSAL):
      temporal = _run(seed, batch, scheme).targets_mask_BxTxN
      np.testing.assert_array_equal(temporal, valid & temporal.any(axis=2, keepdims=True))


@pytest.mark.parametrize("scheme, unit, expected", [
    (NEURON, "neuron", 0.3), (TEMPORAL, "bin", 0.3), (CAUSAL, "bin", 0.6), (RANDOM, "entry", 0.3),
    (INTRA, "neuron of R", 0.3)])
def test_ratios(scheme, unit, expected):
  batch, m = _run_many(range(200), _batch(), scheme, zero_ratio=0.0, random_ratio=0.0)
  targets = m.targets_mask_BxTxN
  if unit == "neuron":
    hits, total = targets.any(1).sum(), batch["neuron_mask"].sum()
  elif unit == "bin":
    hits, total = targets.any(2).sum(), (batch["time_mask"] & batch["neuron_mask"].any(1, keepdims=True)).sum()
  elif unit == "entry":
    hits, total = targets.sum(), _valid(batch).sum()
  else:  # intra-region: among the neurons of R (visible or targeted)
    hits, total = targets.any(1).sum(), ((m.inputs_BxTxN != 0).any(1) | targets.any(1)).sum()
  assert abs(hits / total - expected) < 0.05, (unit, hits / total)


def test_same_key_same_mask_and_different_key_different_mask():
  batch = _batch()
  for scheme in range(6):
    a, b = _run(7, batch, scheme), _run(7, batch, scheme)
    np.testing.assert_array_equal(a.targets_mask_BxTxN, b.targets_mask_BxTxN)
    np.testing.assert_array_equal(a.inputs_BxTxN, b.inputs_BxTxN)
  # 144 real entries each hidden w.p. 0.3: two keys agreeing everywhere is (practically) impossible.
  assert not np.array_equal(_run(7, batch, RANDOM).targets_mask_BxTxN, _run(8, batch, RANDOM).targets_mask_BxTxN)


def test_one_compilation_serves_every_scheme():
  batch = _batch()
  _run(0, batch, NEURON)
  compiled = _mask._cache_size()
  for scheme in range(6):  # the scheme id is traced: switching it never retraces or recompiles
    _run(1, batch, scheme, ratio=0.5, zero_ratio=0.0)
  assert _mask._cache_size() == compiled


def test_zero_and_random_ratio_semantics():
  batch = _batch()
  batch["spikes"] = np.where(_valid(batch), 100, 0).astype(np.uint8)  # max count 100: random counts are 0..100

  # zero_ratio = 0, random_ratio = 0: targets are set, inputs untouched (BERT's "keep" case).
  m = _run(0, batch, RANDOM, zero_ratio=0.0, random_ratio=0.0)
  assert m.targets_mask_BxTxN.any()
  np.testing.assert_array_equal(m.inputs_BxTxN, batch["spikes"])

  # zero_ratio = 1 (default): every target is zero, every other entry untouched.
  m = _run(0, batch, RANDOM)
  np.testing.assert_array_equal(m.inputs_BxTxN, np.where(m.targets_mask_BxTxN, 0, batch["spikes"]))

  # zero_ratio = 0, random_ratio = 1: every target is a random integer in 0..100; others untouched.
  many, m = _run_many(range(40), batch, RANDOM, zero_ratio=0.0, random_ratio=1.0)
  t = m.targets_mask_BxTxN
  np.testing.assert_array_equal(m.inputs_BxTxN[~t], many["spikes"][~t])
  values = m.inputs_BxTxN[t]
  assert (values == np.round(values)).all() and values.min() >= 0 and values.max() <= 100
  assert len(np.unique(values)) > 50  # spread over the range
  assert abs(values.mean() - 50) < 5

  # zero_ratio = 0.5, random_ratio = 0.5: of the targets, 1/2 zeroed, 1/4 random, 1/4 unchanged (≈ 1/101 of
  # the random ones land on 0 or 100 by chance).
  _, m = _run_many(range(40), batch, RANDOM, zero_ratio=0.5, random_ratio=0.5)
  values = m.inputs_BxTxN[m.targets_mask_BxTxN]
  assert abs(np.mean(values == 0) - 0.5) < 0.04
  assert abs(np.mean(values == 100) - 0.25) < 0.04
  assert abs(np.mean((values > 0) & (values < 100)) - 0.25) < 0.04


def _ndt1_masking_config():
  return configs.get_config("ndt1").masking


def test_mask_and_prompt_follows_the_config():
  cfg = _ndt1_masking_config()
  batch = _batch()
  fn = jax.jit(lambda key, batch: masking.mask_and_prompt(key, batch, cfg))
  masked = [fn(jax.random.key(seed), batch) for seed in range(40)]
  for m in masked:
    assert int(m.prompt_idx) == int(m.scheme_id) and bool(m.causal) == (int(m.scheme_id) == CAUSAL)
  seen = {int(m.scheme_id) for m in masked}
  assert seen == set(masking.scheme_ids(cfg.mtm_schemes)) == {NEURON, CAUSAL, INTER, INTRA}

  cfg.mtm_schemes = "neuron,temporal"
  assert masking.configured_scheme_ids(cfg) == (NEURON, TEMPORAL)
  cfg.scheme = "temporal"
  assert masking.configured_scheme_ids(cfg) == (TEMPORAL,)
  cfg.scheme = "nueron"
  with pytest.raises(ValueError, match="nueron"):
    masking.mask_and_prompt(jax.random.key(0), batch, cfg)


@pytest.mark.parametrize("scheme", [NEURON, CAUSAL])
def test_a_fixed_schemes_draw_is_hashed_once_not_in_each_consumer(scheme):
  # With the scheme known at compile time, XLA inlines it: a draw written out as jnp ops would fuse into every
  # consumer of the masks and be hashed again per element of the [B, T, N] broadcast (NDT2's step +22 %).
  batch = _batch()
  B, T, N = batch["spikes"].shape

  def consumers(key, batch):
    masked = masking.mask_batch(key, batch, scheme)
    targets = masked.targets_mask_BxTxN
    return masked.inputs_BxTxN * 2.0, jnp.where(targets, jnp.exp(masked.inputs_BxTxN), 0.0), targets.sum()

  hlo = jax.jit(consumers).lower(jax.random.key(0), batch).compile().as_text()
  bodies = {name: body for name, body in re.findall(r"\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S)}
  hashing = []
  for shape, called in re.findall(r"= (\w+\[[\d,]*\])\S* fusion\(.*?calls=%?([\w.\-]+)", hlo):
    dims = [int(d) for d in re.findall(r"\d+", shape.split("[", 1)[1])]
    if int(np.prod(dims)) == B * T * N and "shift-left" in bodies.get(called, ""):
      hashing.append((shape, called))
  assert not hashing, hashing
