"""`python -m ibl_jax.data prepare alf|nwb`: folders and files written here by hand, counts against a reference
binned here from the definition, every bad input, and the unaligned chunks."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ibl_jax.data import cache
from ibl_jax.data.__main__ import main as data_main
from ibl_jax.data.sessions import load_raw, load_session

STIM_ON = 2.0 + 3.0 * np.arange(24)  # 24 trials, one every 3 s
# Allen ids of some channels and their acronyms (Allen, Beryl, Cosmos) — from the Allen ontology.
ATLAS = {385: ("VISp", "VISp", "Isocortex"), 382: ("CA1", "CA1", "HPF"), 10703: ("DG-mo", "DG", "HPF"),
         409: ("VISl", "VISl", "Isocortex")}


def make_recording(seed=0):
  """Two probes' spikes (Poisson plus spikes on bin edges and a burst over 255), trials with each reason to drop."""
  rng = np.random.default_rng(seed)
  end = STIM_ON[-1] + 3.0
  probes = []
  for n_clusters, channel_ids in ((5, [385, 382, 10703, 385]), (3, [409, 382, 409])):
    times, clusters = [], []
    for c in range(n_clusters):
      t = np.sort(rng.uniform(0, end, rng.poisson(15 * end)))
      times.append(t)
      clusters.append(np.full(len(t), c))
    # Spikes exactly on bin edges of trial 3 (t0 + 0.02 k): each belongs to the bin it opens.
    edge = STIM_ON[3] - 0.5 + 0.02 * np.arange(0, 100, 7)
    times.append(edge)
    clusters.append(np.zeros(len(edge), int))
    t, c = np.concatenate(times), np.concatenate(clusters)
    order = np.argsort(t, kind="stable")
    probes.append({"times": t[order], "clusters": c[order], "channels": rng.integers(0, len(channel_ids),
                                                                                      n_clusters),
                   "channel_ids": np.array(channel_ids), "depths": rng.uniform(0, 3800, n_clusters).round(1),
                   "uuids": [f"uuid-{len(probes)}-{i}" for i in range(n_clusters)],
                   "label": np.where(np.arange(n_clusters) % 3 == 2, 0.6666, 1.0)})
  # A burst of 300 spikes in one 20 ms bin of trial 5 for probe 0's cluster 1: clipped to 255.
  burst = STIM_ON[5] - 0.5 + 0.02 * 40 + 0.001 + np.linspace(0, 0.018, 300)
  p0 = probes[0]
  t = np.concatenate([p0["times"], burst])
  c = np.concatenate([p0["clusters"], np.ones(300, int)])
  order = np.argsort(t, kind="stable")
  p0["times"], p0["clusters"] = t[order], c[order]
  K = len(STIM_ON)
  fm = STIM_ON + rng.uniform(0.15, 0.6, K)
  trials = {"stimOn_times": STIM_ON.copy(), "firstMovement_times": fm, "feedback_times": fm + 0.3,
            "choice": rng.choice([-1.0, 1.0], K), "feedbackType": rng.choice([-1.0, 1.0], K),
            "probabilityLeft": rng.choice([0.2, 0.5, 0.8], K), "goCue_times": STIM_ON + 0.01,
            "intervals_0": STIM_ON - 1.0, "intervals_1": STIM_ON + 2.0}
  trials["choice"][1] = 0  # no choice
  trials["firstMovement_times"][4] = np.nan
  trials["firstMovement_times"][7] = STIM_ON[7] + 0.05  # too fast
  trials["firstMovement_times"][9] = STIM_ON[9] + 2.5  # too slow
  trials["probabilityLeft"][11] = np.nan
  trials["feedbackType"][13] = np.nan
  keep = np.ones(K, bool)
  keep[[1, 4, 7, 9, 11, 13]] = False
  wheel_t = np.arange(0, end, 0.001)
  me_t = np.arange(0, end, 1 / 60)
  return {"probes": probes, "trials": trials, "keep": keep, "wheel": (wheel_t, 2.0 * wheel_t),
          "me": (me_t, 5.0 + me_t)}


def write_alf(rec, root, probes_as=("probe00/pykilosort", "probe01")):
  """An ONE cache session folder, written with numpy/pandas only."""
  session = Path(root) / "cortexlab" / "Subjects" / "KS001" / "2024-05-01" / "001"
  alf = session / "alf"
  for p, sub in zip(rec["probes"], probes_as):
    d = alf / sub
    d.mkdir(parents=True)
    np.save(d / "spikes.times.npy", p["times"])
    np.save(d / "spikes.clusters.npy", p["clusters"].astype(np.uint32))
    np.save(d / "spikes.amps.npy", np.ones(len(p["times"])))
    np.save(d / "clusters.channels.npy", p["channels"])
    np.save(d / "clusters.depths.npy", p["depths"])
    pd.DataFrame({"uuids": p["uuids"]}).to_csv(d / "clusters.uuids.csv", index=False)
    pd.DataFrame({"cluster_id": np.arange(len(p["label"])), "label": p["label"]}).to_parquet(
        d / "clusters.metrics.pqt")
    np.save(d / "channels.brainLocationIds_ccf_2017.npy", p["channel_ids"])
  pd.DataFrame(rec["trials"]).to_parquet(alf / "_ibl_trials.table.pqt")
  np.save(alf / "_ibl_wheel.position.npy", rec["wheel"][1])
  np.save(alf / "_ibl_wheel.timestamps.npy", rec["wheel"][0])
  np.save(alf / "_ibl_leftCamera.ROIMotionEnergy.npy", rec["me"][1])
  np.save(alf / "_ibl_leftCamera.times.npy", rec["me"][0])
  return session


NWB_TRIALS = {"stimOn_times": "stim_on_time", "firstMovement_times": "first_movement_time", "choice": "choice",
              "feedbackType": "feedback_type", "feedback_times": "feedback_time",
              "probabilityLeft": "probability_left"}


def write_nwb(rec, path, *, units=True, trials=True, rename=None, electrodes=True):
  """An NWB file laid out like DANDI 000409's IBL sessions, written with pynwb."""
  import datetime
  from pynwb import NWBHDF5IO, NWBFile, TimeSeries
  from pynwb.behavior import CompassDirection, SpatialSeries
  f = NWBFile(session_description="test", identifier="test-id", session_id="eid-nwb",
              session_start_time=datetime.datetime(2024, 5, 1, tzinfo=datetime.timezone.utc), lab="cortexlab")
  if electrodes:
    device = f.create_device("probe")
    group = f.create_electrode_group("shank", description="", location="brain", device=device)
    for p in rec["probes"]:
      for cid in p["channel_ids"]:
        f.add_electrode(location=ATLAS[int(cid)][0], group=group)
  if units:
    f.add_unit_column("label", "QC")
    f.add_unit_column("uuid", "id")
    f.add_unit_column("mean_relative_depth", "depth")
    offset = 0
    for p in rec["probes"]:
      for c in range(len(p["label"])):
        kw = {"electrodes": [offset + int(p["channels"][c])]} if electrodes else {}
        f.add_unit(spike_times=p["times"][p["clusters"] == c], label=p["label"][c], uuid=p["uuids"][c],
                   mean_relative_depth=p["depths"][c], **kw)
      offset += len(p["channel_ids"])
  if trials:
    names = {**NWB_TRIALS, **(rename or {})}
    for field, name in names.items():
      f.add_trial_column(name, field)
    t = rec["trials"]
    for k in range(len(t["stimOn_times"])):
      f.add_trial(start_time=t["intervals_0"][k], stop_time=t["intervals_1"][k],
                  **{name: t[field][k] for field, name in names.items()})
  behavior = f.create_processing_module("behavior", "behaviour")
  compass = CompassDirection(name="CompassDirection")
  compass.add_spatial_series(SpatialSeries(name="WheelPositionSeries", data=rec["wheel"][1],
                                           timestamps=rec["wheel"][0], reference_frame="wheel", unit="radians"))
  behavior.add(compass)
  behavior.add(TimeSeries(name="LeftCameraMotionEnergy", data=rec["me"][1], timestamps=rec["me"][0], unit="a.u."))
  with NWBHDF5IO(str(path), "w") as io:
    io.write(f)
  return path


def reference_counts(rec, qc=1.0):
  """[K, 100, N] counts from the definition: bin j of trial k counts spikes in [t0 + 0.02 j, t0 + 0.02 (j+1))."""
  units = [(p["times"][p["clusters"] == c]) for p in rec["probes"] for c in range(len(p["label"]))
           if qc is None or p["label"][c] >= qc]
  t0s = rec["trials"]["stimOn_times"][rec["keep"]] - 0.5
  out = np.zeros((len(t0s), 100, len(units)), np.int64)
  for k, t0 in enumerate(t0s):
    for j in range(100):
      lo, hi = t0 + 0.02 * j, t0 + 0.02 * (j + 1)
      for n, s in enumerate(units):
        out[k, j, n] = np.count_nonzero((s >= lo) & (s < hi))
  return out


@pytest.fixture(scope="module")
def rec():
  return make_recording()


@pytest.fixture(scope="module")
def reference(rec):
  return reference_counts(rec)


def _all_rows(out):
  """(trial_idx, counts [K, T, N], behaviours, split of each row) over all splits, sorted by trial_idx."""
  s = load_session(str(out))
  raw = load_raw(str(out))
  idx = np.concatenate([np.asarray(raw[n]["trial_idx"]) for n in s.splits])
  order = np.argsort(idx)
  counts = np.concatenate([s.splits[n].spikes for n in s.splits])[order]
  beh = {k: np.concatenate([s.splits[n].behaviour[k] for n in s.splits])[order]
         for k in s.splits["train"].behaviour}
  split = np.concatenate([[n] * s.splits[n].spikes.shape[0] for n in s.splits])[order]
  return s, idx[order], counts, beh, split


def _prepare(argv, capsys):
  rc = data_main(["prepare", *map(str, argv)])
  captured = capsys.readouterr()
  return rc, captured.out, captured.err


def test_alf_counts_metadata_and_behaviour_match_the_reference(rec, reference, tmp_path, capsys):
  session = write_alf(rec, tmp_path / "cache")
  out = tmp_path / "prepared"
  rc, stdout, err = _prepare(["alf", session, "--out", out], capsys)
  assert rc == 0, err
  assert "1 bin counts above 255 clipped to 255" in err
  s, idx, counts, beh, split = _all_rows(out)
  np.testing.assert_array_equal(idx, np.flatnonzero(rec["keep"]))
  np.testing.assert_array_equal(counts, np.minimum(reference, 255))
  assert reference.max() > 255 and counts.max() == 255
  assert counts[list(idx).index(3), :, 0].sum() >= 15  # the edge spikes landed (each in the bin it opens)
  good = [(p, c) for p in rec["probes"] for c in range(len(p["label"])) if p["label"][c] >= 1]
  assert s.uuids.tolist() == [p["uuids"][c] for p, c in good]
  assert s.regions.tolist() == [ATLAS[int(p["channel_ids"][p["channels"][c]])][0] for p, c in good]
  np.testing.assert_allclose(s.depths, [p["depths"][c] for p, c in good], rtol=1e-6)
  t = {k: v[rec["keep"]] for k, v in rec["trials"].items()}
  np.testing.assert_array_equal(beh["choice"], t["choice"])
  np.testing.assert_array_equal(beh["block"], t["probabilityLeft"].astype(np.float32))
  np.testing.assert_array_equal(beh["reward"], (t["feedbackType"] == 1).astype(np.float32))
  np.testing.assert_allclose(beh["wheel-speed"], 2.0, rtol=1e-3)  # position = 2 t: speed 2 rad/s everywhere
  right_edges = t["stimOn_times"][:, None] - 0.5 + 0.02 * np.arange(1, 101)
  np.testing.assert_allclose(beh["whisker-motion-energy"], 5.0 + right_edges, rtol=1e-5)
  K = len(idx)
  assert [int((split == n).sum()) for n in ("train", "val", "test")] == [round(0.7 * K), round(0.1 * K),
                                                                          K - round(0.7 * K) - round(0.1 * K)]
  meta = json.loads((out / "prepare.json").read_text())
  assert meta["reader"] == "alf" and meta["n_clipped"] == 1 and meta["n_units"] == len(good)
  assert s.eid == "KS001_2024-05-01_001"
  # No temporary folder left (the array cache that load_session builds beside the data is meant to stay).
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != cache.DEFAULT_DIRNAME]


def test_nwb_gives_the_same_session_as_alf(rec, reference, tmp_path, capsys):
  path = write_nwb(rec, tmp_path / "s.nwb")
  out = tmp_path / "prepared"
  rc, _, err = _prepare(["nwb", path, "--out", out], capsys)
  assert rc == 0, err
  s, idx, counts, beh, _ = _all_rows(out)
  np.testing.assert_array_equal(idx, np.flatnonzero(rec["keep"]))
  np.testing.assert_array_equal(counts, np.minimum(reference, 255))
  good = [(p, c) for p in rec["probes"] for c in range(len(p["label"])) if p["label"][c] >= 1]
  assert s.regions.tolist() == [ATLAS[int(p["channel_ids"][p["channels"][c]])][0] for p, c in good]
  assert s.eid == "eid-nwb"
  np.testing.assert_allclose(beh["wheel-speed"], 2.0, rtol=1e-3)
  assert set(beh) == {"choice", "block", "reward", "wheel-speed", "whisker-motion-energy"}


def test_nwb_renamed_columns_region_column_and_qc_all(rec, tmp_path, capsys):
  path = write_nwb(rec, tmp_path / "s.nwb", rename={"stimOn_times": "stim_onset"}, electrodes=False)
  rc, _, err = _prepare(["nwb", path, "--out", tmp_path / "a"], capsys)
  assert rc == 2 and "'allen_location'" in err and "--region-column" in err  # no electrodes, no region column
  rc, _, err = _prepare(["nwb", path, "--out", tmp_path / "a", "--region-column", "uuid"], capsys)
  assert rc == 2 and "'stim_on_time'" in err and "--column" in err
  rc, _, err = _prepare(["nwb", path, "--out", tmp_path / "a", "--column", "stimOn_times=stim_onset",
                         "--region-column", "uuid", "--qc", "all"], capsys)
  assert rc == 0, err
  s, _, counts, _, _ = _all_rows(tmp_path / "a")
  np.testing.assert_array_equal(counts, np.minimum(reference_counts(rec, qc=None), 255))
  assert s.regions.tolist() == [u for p in rec["probes"] for u in p["uuids"]]


@pytest.mark.parametrize("mapping", ["beryl", "cosmos"])
def test_region_mappings(rec, tmp_path, capsys, mapping):
  session = write_alf(rec, tmp_path / "cache")
  rc, _, err = _prepare(["alf", session, "--out", tmp_path / "o", "--regions", mapping, "--qc", "all"], capsys)
  assert rc == 0, err
  col = {"beryl": 1, "cosmos": 2}[mapping]
  expected = [ATLAS[int(p["channel_ids"][p["channels"][c]])][col] for p in rec["probes"]
              for c in range(len(p["label"]))]
  assert load_session(str(tmp_path / "o")).regions.tolist() == expected


def test_unaligned_chunks_are_consecutive_2s_windows(rec, tmp_path, capsys):
  session = write_alf(rec, tmp_path / "cache")
  rc, _, err = _prepare(["alf", session, "--out", tmp_path / "u", "--unaligned", "--qc", "all"], capsys)
  assert rc == 0, err
  s = load_session(str(tmp_path / "u"))
  raw = load_raw(str(tmp_path / "u"))
  assert all(not sp.behaviour for sp in s.splits.values())
  idx = np.concatenate([np.asarray(raw[n]["trial_idx"]) for n in s.splits])
  counts = np.concatenate([s.splits[n].spikes for n in s.splits])[np.argsort(idx)]
  units = [p["times"][p["clusters"] == c] for p in rec["probes"] for c in range(len(p["label"]))]
  start = min(u.min() for u in units)
  end = max(u.max() for u in units)
  assert sorted(idx.tolist()) == list(range(int((end - start) // 2.0)))
  for c in (0, 7, len(idx) - 1):  # spot-check chunks against the definition
    for n in (0, 4):
      lo = start + 2.0 * c + 0.02 * np.arange(100)
      expected = [np.count_nonzero((units[n] >= a) & (units[n] < a + 0.02)) for a in lo]
      np.testing.assert_array_equal(counts[c, :, n], np.minimum(expected, 255))
  # An NWB file without trials: the same chunks.
  nwb = write_nwb(rec, tmp_path / "s.nwb", trials=False)
  rc, _, err = _prepare(["nwb", nwb, "--out", tmp_path / "n", "--unaligned", "--qc", "all"], capsys)
  assert rc == 0, err
  s2 = load_session(str(tmp_path / "n"))
  for name in s.splits:
    np.testing.assert_array_equal(s2.splits[name].spikes, s.splits[name].spikes)


def test_alf_optional_files_right_camera_and_missing_qc(rec, tmp_path, capsys):
  session = write_alf(rec, tmp_path / "cache")
  alf = session / "alf"
  for name in ("_ibl_wheel.position.npy", "_ibl_wheel.timestamps.npy"):
    (alf / name).unlink()
  for attr in ("ROIMotionEnergy", "times"):  # only the right camera (150 Hz in IBL; here 7 + t)
    (alf / f"_ibl_leftCamera.{attr}.npy").unlink()
  me_t = np.arange(0, 80, 1 / 150)
  np.save(alf / "_ibl_rightCamera.ROIMotionEnergy.npy", 7.0 + me_t)
  np.save(alf / "_ibl_rightCamera.times.npy", me_t)
  rc, _, err = _prepare(["alf", session, "--out", tmp_path / "o"], capsys)
  assert rc == 0 and "no wheel-speed trace" in err
  _, idx, _, beh, _ = _all_rows(tmp_path / "o")
  assert "wheel-speed" not in beh
  right_edges = rec["trials"]["stimOn_times"][idx][:, None] - 0.5 + 0.02 * np.arange(1, 101)
  np.testing.assert_allclose(beh["whisker-motion-energy"], 7.0 + right_edges, rtol=1e-5)
  for f in alf.rglob("clusters.metrics.pqt"):
    f.unlink()
  rc, _, err = _prepare(["alf", session, "--out", tmp_path / "q"], capsys)
  assert rc == 2 and "no QC label" in err and "--qc all" in err and not (tmp_path / "q").exists()


def test_alf_sorter_choice_and_align_option(rec, tmp_path, capsys):
  session = write_alf(rec, tmp_path / "cache")
  other = session / "alf" / "probe00" / "iblsorter"
  other.mkdir()
  for f in (session / "alf" / "probe00" / "pykilosort").iterdir():
    (other / f.name).write_bytes(f.read_bytes())
  rc, _, err = _prepare(["alf", session, "--out", tmp_path / "o"], capsys)
  assert rc == 2 and "--sorter" in err and "alf/probe00" in err
  rc, _, err = _prepare(["alf", session, "--out", tmp_path / "o", "--sorter", "iblsorter",
                         "--align", "firstMovement_times"], capsys)
  assert rc == 0, err
  s, idx, counts, _, _ = _all_rows(tmp_path / "o")
  # Aligned to movement onset: probe 0 cluster 0's spikes of the first kept trial, counted by hand.
  t0 = rec["trials"]["firstMovement_times"][idx[0]] - 0.5
  spikes = rec["probes"][0]["times"][rec["probes"][0]["clusters"] == 0]
  expected = [np.count_nonzero((spikes >= t0 + 0.02 * j) & (spikes < t0 + 0.02 * (j + 1))) for j in range(100)]
  np.testing.assert_array_equal(counts[0, :, 0], expected)


def test_overlapping_windows_each_count_every_spike_they_hold():
  from ibl_jax.data.prepare import bin_spikes
  times = np.sort(np.random.default_rng(2).uniform(0, 5, 400))
  units = (np.arange(400) % 3).astype(np.int32)
  t0 = np.array([0.3, 1.1, 1.2])  # windows of 2 s: all three overlap
  counts = bin_spikes(times, units, 3, t0)
  for k, start in enumerate(t0):
    for j in (0, 17, 50, 99):
      for n in range(3):
        lo, hi = start + 0.02 * j, start + 0.02 * (j + 1)
        assert counts[k, j, n] == np.count_nonzero((times >= lo) & (times < hi) & (units == n))
  assert counts[1].sum() == np.count_nonzero((times >= 1.1) & (times < 1.1 + 0.02 * 100))


def test_merging_probes_keeps_time_order_and_ties_stable():
  from ibl_jax.data.alf import merge_sorted
  a, b = np.array([0.1, 0.5, 0.5, 2.0]), np.array([0.0, 0.5, 3.0])
  times, units = merge_sorted(a, np.array([0, 1, 2, 3], np.int32), b, np.array([4, 5, 6], np.int32))
  np.testing.assert_array_equal(times, [0.0, 0.1, 0.5, 0.5, 0.5, 2.0, 3.0])
  np.testing.assert_array_equal(units, [4, 0, 1, 2, 5, 3, 6])


def test_vectorised_csr_equals_the_per_trial_encoder():
  from ibl_jax.data import prepare, schema
  rng = np.random.default_rng(0)
  counts = (rng.poisson(0.3, (5, 7, 4)) * (rng.random((5, 7, 4)) < 0.5)).astype(np.uint8)
  counts[2] = 0  # a trial without spikes
  cols = prepare.csr_columns(counts)
  for k in range(5):
    expected = dict(zip(schema.SPIKE_COLUMNS[:3], schema.dense_to_csr(counts[k])))
    for key, (offsets, values) in cols.items():
      np.testing.assert_array_equal(values[offsets[k]:offsets[k + 1]], expected[key])


# ------------------------------------------------------------------------------------------------ bad input


def _alf_case(mutate):
  def make(rec, tmp_path):
    session = write_alf(rec, tmp_path / "cache")
    mutate(session / "alf")
    return ["alf", session]
  return make


def _set(name, fn):
  def mutate(alf):
    path = next(alf.rglob(name))
    np.save(path, fn(np.load(path)))
  return mutate


def _nwb_case(**kwargs):
  def make(rec, tmp_path):
    return ["nwb", write_nwb(rec, tmp_path / "s.nwb", **kwargs)]
  return make


def _trials_all(field, value):
  def mutate(alf):
    t = pd.read_parquet(alf / "_ibl_trials.table.pqt")
    t[field] = value
    t.to_parquet(alf / "_ibl_trials.table.pqt")
  return mutate


def _drop_trials_column(field):
  def mutate(alf):
    pd.read_parquet(alf / "_ibl_trials.table.pqt").drop(columns=field).to_parquet(alf / "_ibl_trials.table.pqt")
  return mutate


BAD = {
    "missing spikes.clusters": (_alf_case(lambda alf: next(alf.rglob("spikes.clusters.npy")).unlink()),
                                "spikes.clusters"),
    "missing channel locations": (_alf_case(lambda alf: next(alf.rglob("channels.brainLocationIds*")).unlink()),
                                  "brainLocationIds_ccf_2017"),
    "unsorted spike times": (_alf_case(_set("spikes.times.npy", lambda t: t[::-1].copy())), "spikes.times"),
    "NaN spike time": (_alf_case(_set("spikes.times.npy", lambda t: np.where(np.arange(len(t)) == 5, np.nan, t))),
                       "spikes.times"),
    "cluster without a channel": (_alf_case(_set("clusters.channels.npy", lambda c: c + 10)), "clusters.channels"),
    "channel without a location": (_alf_case(_set("channels.brainLocationIds_ccf_2017.npy",
                                                  lambda c: c * 0 + 123456789)), "brainLocationIds_ccf_2017"),
    "spikes of unknown clusters": (_alf_case(_set("spikes.clusters.npy", lambda c: c + 50)), "spikes.clusters"),
    "no trial left": (_alf_case(_trials_all("choice", 0.0)), "alf/_ibl_trials"),
    "missing trials column": (_alf_case(_drop_trials_column("feedbackType")), "feedbackType"),
    "nwb without units": (_nwb_case(units=False), "units"),
    "nwb without trials": (_nwb_case(trials=False), "trials"),
    "nwb missing trials column": (_nwb_case(rename={"probabilityLeft": "p_left"}), "probability_left"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_naming_file_and_field_and_writes_nothing(rec, tmp_path, capsys, case):
  make, field = BAD[case]
  argv = make(rec, tmp_path)
  out = tmp_path / "out" / "session"
  rc, stdout, err = _prepare([*argv, "--out", out], capsys)
  lines = err.strip().splitlines()
  assert rc == 2 and lines[-1].startswith("error: ") and field in lines[-1], err
  assert len([ln for ln in lines if ln.startswith("error")]) == 1
  assert argv[0] != "nwb" or str(argv[1]) in lines[-1]  # names the file
  assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))


# ------------------------------------------------------------------------------- the original's trial masks


def test_integer_trial_masks_filter_like_bool_masks(corpus_dir, tmp_path):
  from ibl_jax.data.schema import SessionError
  source = str(corpus_dir / (corpus_dir / "eids.txt").read_text().split()[0])
  full = load_session(source)
  sizes = {n: full.splits[n].spikes.shape[0] for n in ("train", "val", "test")}
  rng = np.random.default_rng(1)
  masks = {n: (rng.random(k) < 0.6).astype(np.int64) for n, k in sizes.items()}
  for m in masks.values():
    m[0] = 1
  np.savez(tmp_path / "per_split.npz", **masks)
  np.save(tmp_path / "flat.npy", np.concatenate([masks[n] for n in ("train", "val", "test")]).astype(np.int8))
  for spec in (str(tmp_path / "per_split.npz"), str(tmp_path / "flat.npy")):
    s = load_session(source, trial_filter=spec)
    for n in sizes:
      keep = masks[n].astype(bool)
      np.testing.assert_array_equal(s.splits[n].spikes, full.splits[n].spikes[keep])
      np.testing.assert_array_equal(s.splits[n].trial_ids, np.flatnonzero(keep))
  np.save(tmp_path / "bad.npy", np.full(sum(sizes.values()), 2))
  with pytest.raises(SessionError, match="value 2 at trial 0; expected 0 or 1"):
    load_session(source, trial_filter=str(tmp_path / "bad.npy"))
  np.save(tmp_path / "short.npy", np.ones(3, int))
  with pytest.raises(SessionError, match=f"length {sum(sizes.values())}"):
    load_session(source, trial_filter=str(tmp_path / "short.npy"))
