"""The synthetic IBL-like corpus: schema read back with `datasets`, determinism, and the generative structure."""

import json

import datasets
import numpy as np
import pytest
import scipy.sparse

from ibl_jax.data import schema, synthetic

SMALL = dict(n_sessions=3, n_test_sessions=1, seed=0, min_neurons=20, max_neurons=40, min_trials=30,
             max_trials=40, progress=False)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic")
  synthetic.write_corpus(out, **SMALL)
  return out


@pytest.fixture(scope="module")
def brain():
  return synthetic.make_brain(0)


@pytest.fixture(scope="module")
def big(brain):
  """A larger in-memory session for the statistical checks."""
  return synthetic.simulate_session(brain, eid="big", n_neurons=120, regions=synthetic.REGIONS, n_trials=250,
                                    seed=7)


def _plans(corpus_dir):
  return json.loads((corpus_dir / "corpus.json").read_text())["sessions"]


def _decode(split_ds):
  """Dense `[K, T, N]` counts from the CSR columns, with scipy (independent of our loader)."""
  mats = [scipy.sparse.csr_matrix((np.asarray(d), np.asarray(i), np.asarray(p)), shape=tuple(s)).toarray()
          for d, i, p, s in zip(split_ds[schema.SPIKES_DATA], split_ds[schema.SPIKES_INDICES],
                                split_ds[schema.SPIKES_INDPTR], split_ds[schema.SPIKES_SHAPE])]
  return np.stack(mats)


def _ridge_r2(X_train, Y_train, X_test, Y_test, lam=1.0):
  """Held-out R² per output column of a ridge regression (inputs and outputs centred on the training set)."""
  mx, my = X_train.mean(0), Y_train.mean(0)
  Xc = X_train - mx
  W = np.linalg.solve(Xc.T @ Xc + lam * np.eye(X_train.shape[1]), Xc.T @ (Y_train - my))
  resid = Y_test - ((X_test - mx) @ W + my)
  return 1 - (resid**2).sum(0) / ((Y_test - Y_test.mean(0))**2).sum(0)


def test_eid_files(corpus_dir):
  lines = lambda name: (corpus_dir / name).read_text().split()
  eids, train, test = lines("eids.txt"), lines("train_eids.txt"), lines("test_eids.txt")
  assert len(eids) == 3 and len(set(eids)) == 3
  assert train == eids[:2] and test == eids[2:]
  assert all((corpus_dir / e / "dataset_dict.json").exists() for e in eids)
  meta = json.loads((corpus_dir / "corpus.json").read_text())
  assert meta["params"]["seed"] == 0 and [p["eid"] for p in meta["sessions"]] == eids


def test_schema_read_back(corpus_dir):
  for plan in _plans(corpus_dir):
    dd = datasets.load_from_disk(str(corpus_dir / plan["eid"]))
    assert set(dd) == set(schema.SPLITS)
    N, T = plan["n_neurons"], synthetic.N_BINS
    assert sum(dd[s].num_rows for s in schema.SPLITS) == plan["n_trials"]
    f = dd["train"].features
    for col in schema.SPIKE_COLUMNS:
      assert f[col] == datasets.List(datasets.Value("int64")), col
    assert f[schema.REGIONS] == f[schema.UUIDS] == datasets.List(datasets.Value("string"))
    assert f[schema.DEPTHS] == datasets.List(datasets.Value("float64"))
    for col in schema.TRIAL_BEHAVIOURS + ("binsize", "interval_len"):
      assert f[col] == datasets.Value("float64"), col
    for col in schema.TRACE_BEHAVIOURS:
      assert f[col] == datasets.List(datasets.Value("float32")), col
    assert f[schema.TRUE_RATES] == datasets.List(datasets.List(datasets.Value("float32")))
    row = dd["test"][0]
    assert row[schema.SPIKES_SHAPE] == [T, N] and len(row[schema.SPIKES_INDPTR]) == T + 1
    assert len(row[schema.REGIONS]) == len(row[schema.DEPTHS]) == len(row[schema.UUIDS]) == N
    assert set(row[schema.REGIONS]) == set(plan["regions"]) and row[schema.EID] == plan["eid"]
    assert len(set(row[schema.UUIDS])) == N
    assert row["binsize"] == 0.02 and row["interval_len"] == 2.0
    assert row["choice"] in (-1.0, 1.0) and row["block"] in (0.2, 0.5, 0.8) and row["reward"] in (0.0, 1.0)
    assert len(row["wheel-speed"]) == len(row["whisker-motion-energy"]) == T
    assert np.asarray(row[schema.TRUE_RATES]).shape == (T, N)


def test_disk_matches_simulation(corpus_dir, brain):
  plan = _plans(corpus_dir)[0]
  sess = synthetic.simulate_session(brain, **{k: v for k, v in plan.items() if k != "test"})
  dd = datasets.load_from_disk(str(corpus_dir / plan["eid"]))
  for split in schema.SPLITS:
    ds, idx = dd[split], sess["splits"][split]
    np.testing.assert_array_equal(ds["trial_index"], idx)
    np.testing.assert_array_equal(_decode(ds), sess["counts_KxTxN"][idx])
    np.testing.assert_array_equal(np.asarray(ds[schema.TRUE_RATES], np.float32), sess["true_rates_KxTxN"][idx])
    np.testing.assert_array_equal(np.asarray(ds["wheel-speed"], np.float32), sess["wheel_speed_KxT"][idx])
    np.testing.assert_array_equal(ds["choice"], sess["choice"][idx])
  assert dd["train"][0][schema.REGIONS] == sess["regions"].tolist()
  np.testing.assert_array_equal(dd["train"][0][schema.DEPTHS], sess["depths"])


def test_splits_70_10_20_disjoint(big):
  splits = big["splits"]
  assert [len(splits[s]) for s in schema.SPLITS] == [175, 25, 50]
  assert np.array_equal(np.sort(np.concatenate(list(splits.values()))), np.arange(250))


def test_deterministic(brain):
  kw = dict(eid="e", n_neurons=30, regions=["CA1", "LP", "PO"], n_trials=20)
  a = synthetic.simulate_session(synthetic.make_brain(0), seed=3, **kw)
  b = synthetic.simulate_session(brain, seed=3, **kw)
  c = synthetic.simulate_session(brain, seed=4, **kw)
  for key in ("counts_KxTxN", "true_rates_KxTxN", "wheel_speed_KxT", "whisker_KxT", "choice", "depths"):
    assert a[key].tobytes() == b[key].tobytes(), key
  assert list(a["uuids"]) == list(b["uuids"])
  assert not np.array_equal(a["counts_KxTxN"], c["counts_KxTxN"])
  assert not np.array_equal(brain.A_DxD, synthetic.make_brain(1).A_DxD)


def test_sparsity_and_rates(big):
  counts, rates = big["counts_KxTxN"], big["true_rates_KxTxN"]
  assert counts.dtype == np.uint8 and rates.dtype == np.float32
  mean_hz_N = rates.mean((0, 1)) / schema.BINSIZE_S
  assert np.mean((mean_hz_N >= 1) & (mean_hz_N <= 30)) > 0.85
  assert np.mean(counts[counts > 0] == 1) > 0.7
  assert np.mean(counts == 0) > 0.7
  # Counts are Poisson draws from the stored rates: totals agree within a few standard errors.
  assert abs(counts.sum() - rates.sum()) < 5 * np.sqrt(rates.sum())


def test_depths_follow_regions(big):
  for region, (lo, hi) in synthetic.DEPTH_BANDS_UM.items():
    d = big["depths"][big["regions"] == region]
    assert d.size and d.min() >= lo and d.max() <= hi
  assert np.all(np.diff(big["depths"]) >= 0)


def test_inter_region_information(big):
  """Another region's true rates predict a region's true rates on held-out trials."""
  rates, regions, tr, te = big["true_rates_KxTxN"], big["regions"], big["splits"]["train"], big["splits"]["test"]
  for target in ("VISa", "DG", "PO"):
    m = regions == target
    X, Y = np.log(rates[:, :, ~m]), rates[:, :, m]
    X = X - X[tr].mean(0)  # remove the trial-averaged time course: single-trial information only
    Y = Y - Y[tr].mean(0)
    flat = lambda a, idx: a[idx].reshape(-1, a.shape[-1])
    r2 = _ridge_r2(flat(X, tr), flat(Y, tr), flat(X, te), flat(Y, te))
    assert np.median(r2) > 0.1, (target, np.median(r2))


def test_psth_differs_by_choice(big):
  rates, choice = big["true_rates_KxTxN"], big["choice"]
  diff = lambda labels: np.abs(rates[labels > 0].mean(0) - rates[labels < 0].mean(0)).mean()
  shuffled = np.random.default_rng(0).permutation(choice)
  assert diff(choice) > 2 * diff(shuffled)
  assert set(np.unique(big["block"])) == {0.2, 0.5, 0.8}
  # The psychometric curve: at full contrast the choice mostly follows the stimulus.
  full = (big["contrast_left"] == 1) | (big["contrast_right"] == 1)
  assert big["reward"][full].mean() > 0.8


def test_behaviour(big):
  wheel, onset = big["wheel_speed_KxT"], big["movement_onset_bin"]
  assert wheel.min() >= 0 and big["whisker_KxT"].min() >= 0
  assert onset.min() >= synthetic.STIM_BIN + 5 and onset.max() <= synthetic.STIM_BIN + 25
  after = np.mean([wheel[k, o:o + 15].mean() for k, o in enumerate(onset)])
  assert after > 10 * wheel[:, :synthetic.STIM_BIN].mean()
  # Whisker motion energy is decodable from the rates, but not perfectly.
  rates, tr, te = big["true_rates_KxTxN"], big["splits"]["train"], big["splits"]["test"]
  X, y = np.log(rates), big["whisker_KxT"][..., None]
  r2 = _ridge_r2(X[tr].reshape(-1, X.shape[-1]), y[tr].reshape(-1, 1), X[te].reshape(-1, X.shape[-1]),
                 y[te].reshape(-1, 1))[0]
  assert 0.2 < r2 < 0.95


def test_ensure_corpus(tmp_path):
  kw = dict(n_sessions=2, n_test_sessions=1, min_neurons=10, max_neurons=12, min_trials=10, max_trials=10,
            progress=False)
  out = synthetic.ensure_corpus(tmp_path / "c", **kw)
  stamp = (out / "eids.txt").stat().st_mtime_ns
  assert synthetic.ensure_corpus(out, **kw) == out and (out / "eids.txt").stat().st_mtime_ns == stamp
  assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary directory left behind
  with pytest.raises(ValueError, match="other parameters"):
    synthetic.ensure_corpus(out, n_sessions=3)


def test_brain_seed_makes_new_sessions_of_the_same_brain(tmp_path, brain):
  # seed 1 with brain 0: other sessions (eids, plans) than corpus 0, whose true rates come from brain 0's dynamics.
  out = tmp_path / "small"
  synthetic.write_corpus(out, n_sessions=2, n_test_sessions=1, seed=1, brain_seed=0, min_neurons=10, max_neurons=12,
                         min_trials=12, max_trials=14, progress=False)
  plan = _plans(out)[0]
  assert json.loads((out / "corpus.json").read_text())["params"]["brain_seed"] == 0
  same = synthetic.simulate_session(brain, **{k: v for k, v in plan.items() if k != "test"})
  other = synthetic.simulate_session(synthetic.make_brain(1), **{k: v for k, v in plan.items() if k != "test"})
  idx = same["splits"]["train"]
  on_disk = np.asarray(datasets.load_from_disk(str(out / plan["eid"]))["train"][schema.TRUE_RATES], np.float32)
  np.testing.assert_array_equal(on_disk, same["true_rates_KxTxN"][idx])
  assert not np.array_equal(on_disk, other["true_rates_KxTxN"][idx])
