"""The array cache (docs/design.md §3): decoded once, memory-mapped after, invalidated, rebuilt when damaged."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ibl_jax.data import cache, sessions, synthetic


def _first_session(corpus_dir) -> Path:
  return Path(corpus_dir) / (Path(corpus_dir) / "eids.txt").read_text().split()[0]


def _assert_same(got: sessions.Session, want: sessions.Session):
  assert got.eid == want.eid
  np.testing.assert_array_equal(got.regions, want.regions)
  np.testing.assert_array_equal(got.depths, want.depths)
  np.testing.assert_array_equal(got.uuids, want.uuids)
  assert list(got.splits) == list(want.splits)
  for name, w in want.splits.items():
    g = got.splits[name]
    assert g.spikes.dtype == np.uint8 and g.spikes.shape == w.spikes.shape
    np.testing.assert_array_equal(g.spikes, w.spikes)
    np.testing.assert_array_equal(g.trial_ids, w.trial_ids)
    np.testing.assert_allclose(g.mean_counts(), w.spikes.astype(np.float64).mean(axis=(0, 1)), rtol=1e-12)
    assert sorted(g.behaviour) == sorted(w.behaviour)
    for b in w.behaviour:
      np.testing.assert_array_equal(g.behaviour[b], w.behaviour[b])
    if w.true_rates is None:
      assert g.true_rates is None
    else:
      np.testing.assert_array_equal(g.true_rates, w.true_rates)


def _no_decoding(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("decoded the Arrow columns although the cache was valid")
  monkeypatch.setattr(sessions, "_decode", fail)


def test_cache_equals_direct_decoding_and_is_mapped_after(corpus_dir, tmp_path, monkeypatch):
  source = str(_first_session(corpus_dir))
  direct = sessions.load_session(source, with_true_rates=True, array_cache="off")
  built = sessions.load_session(source, with_true_rates=True, array_cache=str(tmp_path))
  _assert_same(built, direct)
  _no_decoding(monkeypatch)  # every later open reads the cache alone
  mapped = sessions.load_session(source, with_true_rates=True, array_cache=str(tmp_path))
  _assert_same(mapped, direct)
  for split in mapped.splits.values():  # read-only views of files, not copies in memory
    assert split.mean_counts_N is not None  # from the entry: the readout bias reads no trial
    for arr in (split.spikes, split.true_rates, *split.behaviour.values()):
      assert not arr.flags.writeable and not arr.flags.owndata
  # Selections apply on top of the cached arrays exactly as on decoded ones.
  keep = {"train": np.arange(direct.splits["train"].spikes.shape[0]) % 3 == 0}
  kwargs = dict(trial_filter=keep, regions=["CA1", "LP", "VISa", "DG"], neuron_order="region")
  monkeypatch.undo()
  _assert_same(sessions.load_session(source, array_cache=str(tmp_path), **kwargs),
               sessions.load_session(source, array_cache="off", **kwargs))


def _mapped_rss_kb() -> int:
  return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                  if line.startswith("RssFile")).split()[1])


def test_take_trials_reads_mapped_rows_without_mapping_them(tmp_path):
  spikes_KxTxN = np.random.default_rng(0).integers(0, 9, (64, 50, 300)).astype(np.uint8)
  rates_KxTxN = np.random.default_rng(1).random((64, 50, 300), np.float32)
  entry = tmp_path / "entry"
  cache.write_entry(entry, {"k": 1}, {"spikes": spikes_KxTxN, "rates": rates_KxTxN}, {})
  arrays, _ = cache.open_entry(entry, {"k": 1})
  trials = np.array([5, 6, 7, 3, 3, 63, -1, 0, 40, 41])  # runs of consecutive trials, a repeat, a negative index
  cache.take_trials(arrays["rates"], trials)  # the first call maps its own code's pages
  before = _mapped_rss_kb()
  got = {name: cache.take_trials(arrays[name], trials) for name in ("spikes", "rates")}
  read = _mapped_rss_kb()
  through_map = arrays["spikes"][trials]
  # 8 distinct trials of 15 KB: at least 32 pages of 4 KB mapped when read through the map, none with pread.
  assert read - before < 32 and _mapped_rss_kb() - read >= 120, (before, read, _mapped_rss_kb())
  for name, want in (("spikes", spikes_KxTxN), ("rates", rates_KxTxN)):
    np.testing.assert_array_equal(got[name], want[trials])
    assert got[name].flags.owndata and got[name].flags.writeable
    assert cache.take_trials(arrays[name], np.array([], int)).shape == (0, *want.shape[1:])
  np.testing.assert_array_equal(through_map, spikes_KxTxN[trials])
  with pytest.raises(IndexError):
    cache.take_trials(arrays["spikes"], np.array([64]))
  plain = np.arange(12).reshape(4, 3)  # not from the cache: plain indexing
  np.testing.assert_array_equal(cache.take_trials(plain, np.array([2, 0])), plain[[2, 0]])


def test_session_in_memory_is_a_private_copy_of_a_cached_one(corpus_dir, tmp_path):
  source = str(_first_session(corpus_dir))
  mapped = sessions.load_session(source, with_true_rates=True, array_cache=str(tmp_path))
  copy = sessions.in_memory(mapped)
  _assert_same(copy, mapped)
  for split in copy.splits.values():
    assert split.spikes.flags.owndata and split.true_rates.flags.owndata  # read with pread, not views of the maps
  decoded = sessions.load_session(source, with_true_rates=True, array_cache="off")
  assert sessions.in_memory(decoded).splits["test"].spikes is decoded.splits["test"].spikes  # already in memory


def test_default_location_is_beside_the_data_and_off_writes_nothing(corpus_dir, tmp_path):
  src = tmp_path / "corpus" / "sess"
  shutil.copytree(_first_session(corpus_dir), src)
  assert cache.session_dir(str(src), None) == src.parent / ".ibl_jax_cache" / "sess"
  sessions.load_session(str(src), array_cache="off")
  assert not (src.parent / ".ibl_jax_cache").exists()
  sessions.load_session(str(src))
  assert (src.parent / ".ibl_jax_cache" / "sess" / "base" / cache.MANIFEST).exists()
  # A directory of sessions still lists the sessions only, not the cache beside them.
  assert sessions.resolve_sources(str(src.parent)) == [str(src)]


def test_where_entries_live(tmp_path):
  src = tmp_path / "data" / "sess"
  src.mkdir(parents=True)
  named = cache.session_dir(str(src), str(tmp_path / "c"))
  assert named.parent == tmp_path / "c" and named.name.startswith("sess-")
  other = tmp_path / "elsewhere" / "sess"  # same name, other directory: another entry
  other.mkdir(parents=True)
  assert cache.session_dir(str(other), str(tmp_path / "c")) != named
  assert cache.session_dir("owner/name", None, str(tmp_path / "hub")) == tmp_path / "hub" / "ibl_jax_arrays" / "owner__name"
  assert cache.session_dir(str(src), "off") is None and cache.session_dir(str(src), "OFF") is None


def test_source_change_invalidates(corpus_dir, tmp_path, capsys):
  eids = (Path(corpus_dir) / "eids.txt").read_text().split()
  src = tmp_path / "data" / "sess"
  shutil.copytree(Path(corpus_dir) / eids[0], src)
  array_cache = str(tmp_path / "cache")
  first = sessions.load_session(str(src), array_cache=array_cache)
  assert first.eid == eids[0]
  # Another session's files at the same path: sizes and mtimes differ, the cache must follow.
  shutil.rmtree(src)
  shutil.copytree(Path(corpus_dir) / eids[1], src)
  capsys.readouterr()
  second = sessions.load_session(str(src), array_cache=array_cache)
  assert "stale" in capsys.readouterr().err
  _assert_same(second, sessions.load_session(str(src), array_cache="off"))
  # A rewrite that keeps every size (here only the mtime moves) still invalidates: size + mtime, not content.
  arrow = next(src.glob("train/*.arrow"))
  os.utime(arrow, ns=(arrow.stat().st_atime_ns, arrow.stat().st_mtime_ns + 10**9))
  sessions.load_session(str(src), array_cache=array_cache)
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "stale" in err


def _truncate(entry: Path):
  f = entry / "train.spikes.npy"
  f.write_bytes(f.read_bytes()[:-7])


def _delete_behaviour(entry: Path):
  (entry / "val.choice.npy").unlink()


def _garbage_manifest(entry: Path):
  (entry / cache.MANIFEST).write_text('{"format": 1, "ke')


def _same_size_other_shape(entry: Path):
  f = entry / "test.spikes.npy"
  arr = np.load(f)
  np.save(f, arr.reshape(arr.shape[0] * arr.shape[1], arr.shape[2]))  # same bytes, other header shape
  assert f.stat().st_size == json.loads((entry / cache.MANIFEST).read_text())["arrays"]["test.spikes"]["bytes"]


@pytest.mark.parametrize("damage", [_truncate, _delete_behaviour, _garbage_manifest, _same_size_other_shape])
def test_damaged_cache_is_detected_and_rebuilt(corpus_dir, tmp_path, capsys, damage):
  source = str(_first_session(corpus_dir))
  direct = sessions.load_session(source, array_cache="off")
  sessions.load_session(source, array_cache=str(tmp_path))
  entry = cache.session_dir(source, str(tmp_path)) / "base"
  damage(entry)
  with pytest.raises(cache.Damaged):
    cache.open_entry(entry, {"source": cache.fingerprint(Path(source))})
  capsys.readouterr()
  _assert_same(sessions.load_session(source, array_cache=str(tmp_path)), direct)
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "damaged" in err and str(entry) in err
  cache.open_entry(entry, {"source": cache.fingerprint(Path(source))})  # whole again


_BUILDER = """
import sys, time
from ibl_jax.data import sessions
decode, calls = sessions._decode, []
def counted(*a, **k):  # a slow build: the other process arrives while this one holds the lock
  calls.append(1)
  time.sleep(3)
  return decode(*a, **k)
sessions._decode = counted
s = sessions.load_session(sys.argv[1], array_cache=sys.argv[2], with_true_rates=True)
print(len(calls), int(s.splits["train"].spikes.sum()), s.eid)
"""


def test_two_processes_building_at_once_build_once(corpus_dir, tmp_path, subprocess_env):
  source = str(_first_session(corpus_dir))
  procs = [subprocess.Popen([sys.executable, "-c", _BUILDER, source, str(tmp_path)], env=subprocess_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
  results = [o[0].split() for o in outs]
  direct = sessions.load_session(source, array_cache="off")
  assert sorted(int(r[0]) for r in results) == [0, 1]  # one decoded; the other waited and mapped its result
  assert all(r[1:] == [str(int(direct.splits["train"].spikes.sum())), direct.eid] for r in results)
  entry_dir = cache.session_dir(source, str(tmp_path))
  assert sorted(p.name for p in entry_dir.iterdir() if not p.name.endswith(".lock")) == ["base", "true_rates"]


def test_synthetic_without_true_rates_in_two_workers_matches(corpus_dir, tmp_path):
  # Same seed and ranges as the fixture: session i is the same function of its seed, whatever the options.
  out = tmp_path / "syn"
  eids = synthetic.write_corpus(out, n_sessions=2, n_test_sessions=1, seed=0, min_neurons=12, max_neurons=24,
                                min_trials=30, max_trials=40, true_rates=False, workers=2, progress=False)
  assert json.loads((out / "corpus.json").read_text())["params"]["true_rates"] is False
  for eid in eids:
    got = sessions.load_session(str(out / eid), with_true_rates=True, array_cache=str(tmp_path / "cache"))
    want = sessions.load_session(str(Path(corpus_dir) / eid), array_cache="off")
    assert all(split.true_rates is None for split in got.splits.values())
    _assert_same(got, want)
