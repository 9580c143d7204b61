"""The session data layer: CSR decoding, loading a dataset written directly with `datasets`, validation, batches."""

import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import scipy.sparse

from ibl_jax.data import schema
from ibl_jax.data.batches import BatchIterator, sequential_batches
from ibl_jax.data.schema import Ragged, SessionError
from ibl_jax.data.sessions import load_corpus, load_session, resolve_sources

T = 12
REGIONS = ["CA1", "DG", "CA1", "PO", "DG"]
DEPTHS = [300.0, 100.0, 250.0, 900.0, 120.0]


def _decode(dense_list, T_, N):
  csr = [scipy.sparse.csr_matrix(d) for d in dense_list]
  return schema.csr_to_dense(Ragged.from_lists([c.data for c in csr]), Ragged.from_lists([c.indices for c in csr]),
                             Ragged.from_lists([c.indptr for c in csr]), T_, N)


@pytest.mark.parametrize("seed", range(4))
def test_csr_decode_matches_dense(seed):
  rng = np.random.default_rng(seed)
  K, T_, N = 7, 9, 11
  dense = (rng.poisson(0.4, (K, T_, N)) * (rng.random((K, T_, N)) < 0.5)).astype(np.uint8)
  dense[2] = 0  # an all-zero trial
  dense[4, 3] = 0  # an empty row (time bin)
  dense[5, :, :] = 0
  dense[5, -1, -1] = 255  # the largest count, in the last entry
  np.testing.assert_array_equal(_decode(list(dense), T_, N), dense)


def test_csr_roundtrip_with_our_encoder_and_duplicates_sum():
  rng = np.random.default_rng(0)
  dense = rng.poisson(0.5, (3, 5, 4)).astype(np.uint8)
  parts = [schema.dense_to_csr(d) for d in dense]
  got = schema.csr_to_dense(*(Ragged.from_lists([p[i] for p in parts]) for i in range(3)), 5, 4)
  np.testing.assert_array_equal(got, dense)
  # A non-canonical CSR row holding neuron 1 twice: scipy sums duplicates, so must we.
  dup = schema.csr_to_dense(Ragged.from_lists([[2, 3]]), Ragged.from_lists([[1, 1]]),
                            Ragged.from_lists([[0, 2, 2]]), 2, 3)
  np.testing.assert_array_equal(dup[0], [[0, 5, 0], [0, 0, 0]])


def _rows(spikes_KxTxN, eid="sess-a", regions=REGIONS, with_behaviour=True, rng=None):
  rng = rng or np.random.default_rng(0)
  rows = []
  for counts in spikes_KxTxN:
    m = scipy.sparse.csr_matrix(counts)
    row = {"spikes_sparse_data": m.data.astype(int).tolist(), "spikes_sparse_indices": m.indices.tolist(),
           "spikes_sparse_indptr": m.indptr.tolist(), "spikes_sparse_shape": list(counts.shape),
           "cluster_regions": list(regions), "cluster_depths": list(DEPTHS[:len(regions)]),
           "cluster_uuids": [f"u{i}" for i in range(len(regions))], "eid": eid, "subject": "KS001",
           "cluster_qc": ["good"] * len(regions), "unknown_extra": 7}
    if with_behaviour:
      row.update({"choice": float(rng.choice([-1, 1])), "block": 0.8, "reward": 1.0,
                  "wheel-speed": rng.random(counts.shape[0]).tolist(),
                  "whisker-motion-energy": rng.random(counts.shape[0]).tolist()})
    rows.append(row)
  return rows


def _write(path, splits):
  dd = datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})
  dd.save_to_disk(str(path))
  return str(path)


@pytest.fixture(scope="module")
def session_dir(tmp_path_factory):
  rng = np.random.default_rng(1)
  spikes = {name: rng.poisson(0.3, (k, T, len(REGIONS))).astype(np.uint8)
            for name, k in (("train", 8), ("val", 3), ("test", 4))}
  path = _write(tmp_path_factory.mktemp("sess") / "sess-a", {k: _rows(v, rng=rng) for k, v in spikes.items()})
  return path, spikes


def test_loader_returns_exact_counts_and_metadata(session_dir):
  path, spikes = session_dir
  s = load_session(path)
  assert s.eid == "sess-a" and s.num_neurons == 5 and s.num_bins == T
  for name, counts in spikes.items():
    assert s.splits[name].spikes.dtype == np.uint8
    np.testing.assert_array_equal(s.splits[name].spikes, counts)
  assert s.regions.tolist() == REGIONS and s.uuids.tolist() == [f"u{i}" for i in range(5)]
  b = s.splits["train"].behaviour
  assert b["choice"].shape == (8,) and b["wheel-speed"].shape == (8, T) and b["block"][0] == np.float32(0.8)


def test_neuron_order_region_filter_and_trial_filter(session_dir, tmp_path):
  path, spikes = session_dir
  by_depth = load_session(path, neuron_order="depth")
  assert by_depth.depths.tolist() == sorted(DEPTHS)
  np.testing.assert_array_equal(by_depth.splits["test"].spikes, spikes["test"][:, :, np.argsort(DEPTHS)])
  by_region = load_session(path, neuron_order="region")
  assert by_region.regions.tolist() == ["CA1", "CA1", "DG", "DG", "PO"]
  assert by_region.depths.tolist() == [250.0, 300.0, 100.0, 120.0, 900.0]
  only = load_session(path, regions=["DG"])
  np.testing.assert_array_equal(only.splits["train"].spikes, spikes["train"][:, :, [1, 4]])
  keep = np.array([True, False, True, False, True, True, False, True])
  np.savez(tmp_path / "filter.npz", train=keep)
  filtered = load_session(path, trial_filter=str(tmp_path / "filter.npz"))
  np.testing.assert_array_equal(filtered.splits["train"].spikes, spikes["train"][keep])
  assert filtered.splits["train"].trial_ids.tolist() == [0, 2, 4, 5, 7]
  assert filtered.splits["val"].spikes.shape[0] == 3


def _bad_session(tmp_path, mutate, splits=("train", "val", "test")):
  rng = np.random.default_rng(0)
  out = {}
  for name in splits:
    rows = _rows(rng.poisson(0.5, (3, T, 5)).astype(np.uint8), rng=rng)
    out[name] = mutate(name, rows) or rows
  return _write(tmp_path / "bad", out)


def _drop(col):
  def f(name, rows):
    for r in rows:
      del r[col]
  return f


def _set(col, fn, split="val", trial=1):
  def f(name, rows):
    if name == split:
      rows[trial][col] = fn(rows[trial])
  return f


BAD_CASES = {
    "missing column": (_drop("cluster_depths"), "column 'cluster_depths': missing"),
    "indptr length": (_set("spikes_sparse_indptr", lambda r: r["spikes_sparse_indptr"][:-1]),
                      "split 'val', column 'spikes_sparse_indptr': trial 1 has length 12, expected T+1 = 13"),
    "index >= N": (_set("spikes_sparse_indices", lambda r: r["spikes_sparse_indices"][:-1] + [5]),
                   "split 'val', column 'spikes_sparse_indices': trial 1 has neuron index 5, but N = 5"),
    "data/indices lengths": (_set("spikes_sparse_data", lambda r: r["spikes_sparse_data"] + [1]),
                             "split 'val', columns 'spikes_sparse_data'/'spikes_sparse_indices': trial 1"),
    "negative count": (_set("spikes_sparse_data", lambda r: [-1] + r["spikes_sparse_data"][1:]),
                       "split 'val', column 'spikes_sparse_data': trial 1 has count -1; counts must be 0..255"),
    "count over 255": (_set("spikes_sparse_data", lambda r: [256] + r["spikes_sparse_data"][1:]),
                       "column 'spikes_sparse_data': trial 1 has count 256"),
    "metadata length": (_set("cluster_regions", lambda r: r["cluster_regions"][:4], trial=0),
                        "split 'val', column 'cluster_regions': length 4, but the spikes have N = 5"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_gives_one_line_naming_session_split_column(tmp_path, case):
  mutate, expected = BAD_CASES[case]
  path = _bad_session(tmp_path, mutate)
  with pytest.raises(SessionError) as e:
    load_session(path)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("session sess-a") and expected in msg, msg


def test_empty_split_missing_path_and_differing_T(tmp_path):
  rng = np.random.default_rng(0)
  good = _rows(rng.poisson(0.5, (3, T, 5)).astype(np.uint8))
  empty = datasets.Dataset.from_list(good).select([])
  datasets.DatasetDict({"train": datasets.Dataset.from_list(good), "test": empty}).save_to_disk(
      str(tmp_path / "empty"))
  with pytest.raises(SessionError, match=r"session sess-a, split 'test': the split has no trials"):
    load_session(str(tmp_path / "empty"))
  with pytest.raises(SessionError, match="no such directory"):
    load_session(str(tmp_path / "does-not-exist"))
  a = _write(tmp_path / "a", {"train": _rows(rng.poisson(0.5, (3, T, 5)).astype(np.uint8), eid="A")})
  b = _write(tmp_path / "b", {"train": _rows(rng.poisson(0.5, (3, T + 1, 5)).astype(np.uint8), eid="B")})
  with pytest.raises(SessionError, match=r"session B, column 'spikes_sparse_shape': T = 13 bins, but session A"):
    load_corpus([a, b])


def _cli(*args, **env):
  return subprocess.run([sys.executable, "-m", "ibl_jax.data", *args], capture_output=True, text=True,
                        env={**os.environ, **env}, timeout=120)


def test_cli_info_json_and_errors(session_dir, tmp_path):
  path, spikes = session_dir
  out = _cli("info", path, "--json")
  assert out.returncode == 0, out.stderr
  info = json.loads(out.stdout)
  assert info["eid"] == "sess-a" and info["regions"] == {"CA1": 2, "DG": 2, "PO": 1}
  assert info["splits"]["train"] == {**info["splits"]["train"], "trials": 8, "T": T, "N": 5,
                                     "total_spikes": int(spikes["train"].sum())}
  assert info["behaviours"] == ["choice", "block", "reward", "wheel-speed", "whisker-motion-energy"]
  bad = _bad_session(tmp_path, BAD_CASES["index >= N"][0])
  for args, expected in (((bad,), "trial 1 has neuron index 5"), (("no/such-id",), "hub id failed")):
    out = _cli("info", *args, HF_HUB_OFFLINE="1")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and expected in out.stderr, out.stderr


@pytest.fixture(scope="module")
def two_sessions(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(2)
  specs = {"A": ["CA1", "DG", "CA1"], "B": ["PO", "LP", "CA1", "LP", "PO"]}
  for eid, regions in specs.items():
    _write(root / eid, {"train": _rows(rng.poisson(0.5, (5 if eid == "A" else 6, T, len(regions)))
                                       .astype(np.uint8), eid=eid, regions=regions, with_behaviour=False)})
  (root / "eids.txt").write_text("A\n# a comment\nB\n")
  return root


def test_corpus_from_eids_file_has_stable_vocabulary(two_sessions):
  corpus = load_corpus(str(two_sessions / "eids.txt"))
  assert corpus.eids == ["A", "B"] and corpus.n_max == 5
  assert corpus.region_vocab == ["CA1", "DG", "LP", "PO"]
  assert corpus.sessions[1].region_ids.tolist() == [3, 2, 0, 2, 3]
  again = load_corpus([str(two_sessions / "B")], region_vocab=["PO", "XX"])
  assert again.region_vocab == ["PO", "XX", "CA1", "LP"] and again.sessions[0].region_ids.tolist() == [0, 3, 2, 3, 0]
  assert resolve_sources(str(two_sessions)) == [str(two_sessions / "A"), str(two_sessions / "B")]


def test_batches_pad_and_iterator_resumes_identically(two_sessions):
  corpus = load_corpus(str(two_sessions / "eids.txt"))
  it = BatchIterator(corpus, "train", 4, seed=3)
  batches = [next(it) for _ in range(3)]  # 11 trials: epoch 0 gives 2 batches, the third starts epoch 1
  assert it.state() == {"epoch": 1, "position": 4}
  for b in batches:
    assert b["spikes"].shape == (4, T, 5) and b["spikes"].dtype == np.uint8
    for i, s_idx in enumerate(b["session_idx"]):
      n = corpus.sessions[s_idx].num_neurons
      assert b["neuron_mask"][i].sum() == n and not b["spikes"][i, :, n:].any()
      assert (b["neuron_regions"][i, n:] == -1).all()
      np.testing.assert_array_equal(b["neuron_regions"][i, :n], corpus.sessions[s_idx].region_ids)
  seen = np.concatenate([b["session_idx"] for b in batches[:2]])
  assert set(seen.tolist()) == {0, 1}  # batches mix sessions
  # Each trial's spikes are the session's: find it among the session's trials.
  b = batches[0]
  for i, s_idx in enumerate(b["session_idx"]):
    sess = corpus.sessions[s_idx].splits["train"].spikes
    n = sess.shape[2]
    assert any((sess[k] == b["spikes"][i, :, :n]).all() for k in range(len(sess)))
  resumed = BatchIterator(corpus, "train", 4, seed=3)
  resumed.restore({"epoch": 0, "position": 4})
  for expected in batches[1:]:
    got = next(resumed)
    for k in expected:
      np.testing.assert_array_equal(got[k], expected[k])
  # Two processes each build half of every global batch.
  halves = [BatchIterator(corpus, "train", 4, seed=3, process_index=p, process_count=2) for p in range(2)]
  first = [next(h) for h in halves]
  np.testing.assert_array_equal(np.concatenate([f["spikes"] for f in first]), batches[0]["spikes"])


def test_sequential_batches_cover_every_trial_once_with_padding_trials(two_sessions):
  corpus = load_corpus(str(two_sessions / "eids.txt"))
  batches = list(sequential_batches(corpus, "train", 4))
  assert len(batches) == 3
  assert sum(int(b["time_mask"].any(axis=1).sum()) for b in batches) == 11
  last = batches[-1]
  assert last["time_mask"][3:].sum() == 0 and last["neuron_mask"][3:].sum() == 0
  # Two processes each build (and read) only their half of every batch, padding rows included.
  halves = [list(sequential_batches(corpus, "train", 4, process_index=p, process_count=2)) for p in range(2)]
  for b, (h0, h1) in zip(batches, zip(*halves)):
    assert len(h0["session_idx"]) == len(h1["session_idx"]) == 2
    for k in b:
      np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), b[k])
