"""A recording to predictions: prepare (NWB) → info → train 20 steps → evaluate → predict (.npz and NWB)."""

import json

import numpy as np
import pytest

from conftest import tiny_config
from test_prepare import make_recording, reference_counts, write_nwb


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
  from ibl_jax import train
  from ibl_jax.data.__main__ import main as data_main
  tmp = tmp_path_factory.mktemp("roundtrip")
  rec = make_recording(seed=3)
  nwb = write_nwb(rec, tmp / "rec.nwb")
  session = tmp / "sessions" / "mine"
  assert data_main(["prepare", "nwb", str(nwb), "--out", str(session)]) == 0
  config = tiny_config(tmp, tmp / "results", **{"data.sessions": str(session), "training.num_steps": 20,
                                                "training.eval_every": 20, "training.checkpoint_every": 20})
  summary = train.train_and_evaluate(config)
  return {"rec": rec, "nwb": nwb, "session": session, "run": tmp / "results" / "tiny", "summary": summary,
          "tmp": tmp}


def test_prepared_session_trains_evaluates_and_info_reads_it(round_trip, capsys):
  from ibl_jax import evaluate
  from ibl_jax.data.__main__ import main as data_main
  assert data_main(["info", str(round_trip["session"]), "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["eid"] == "eid-nwb" and sum(s["trials"] for s in info["splits"].values()) == round_trip["rec"][
      "keep"].sum()
  assert info["behaviours"] == ["choice", "block", "reward", "wheel-speed", "whisker-motion-energy"]
  assert round_trip["summary"]["steps"] == 20 and np.isfinite(round_trip["summary"]["final_train_loss"])
  run = round_trip["run"]
  assert evaluate.main(["--checkpoint", str(run), "--tasks", "co_smooth", "--no-progress", "--no-figures"]) == 0
  summary = json.loads((run / "eval" / "eid-nwb" / "summary.json").read_text())
  assert summary["n_neurons"] == info["splits"]["test"]["N"]


def test_predict_writes_every_trial_as_npz_and_nwb(round_trip, tmp_path):
  from pynwb import NWBHDF5IO
  from ibl_jax import predict
  rec, run = round_trip["rec"], round_trip["run"]
  assert predict.main(["--checkpoint", str(run), "--out", str(tmp_path), "--no-progress"]) == 0
  with np.load(tmp_path / "eid-nwb.npz") as f:
    p = {k: f[k] for k in f.files}
  kept = np.flatnonzero(rec["keep"])
  K, T, N = p["rates"].shape
  assert (K, T) == (len(kept), 100) and sorted(p["trial_idx"].tolist()) == kept.tolist()
  assert [str(s) for s in dict.fromkeys(p["split"].tolist())] == ["train", "val", "test"]
  order = np.argsort(p["trial_idx"])
  np.testing.assert_array_equal(p["counts"][order], np.minimum(reference_counts(rec), 255))
  np.testing.assert_allclose(p["window_start"][order], rec["trials"]["stimOn_times"][kept] - 0.5)
  assert np.all(np.isfinite(p["rates"])) and np.all(p["rates"] > 0) and N == len(p["uuids"])

  assert predict.main(["--checkpoint", str(run), "--out", str(tmp_path), "--format", "nwb", "--no-progress"]) == 0
  with NWBHDF5IO(str(tmp_path / "eid-nwb.nwb"), "r") as io:
    f = io.read()
    module = f.processing["ibl_jax"]
    np.testing.assert_allclose(module["predicted_rates"].data[:], p["rates"].reshape(K * T, N), rtol=1e-6)
    np.testing.assert_allclose(module["predicted_rates"].timestamps[:T], p["window_start"][0] + 0.02 * np.arange(T))
    assert module["prediction_trials"]["trial_idx"].data[:].tolist() == p["trial_idx"].tolist()
    assert list(module["prediction_units"]["uuid"].data[:]) == p["uuids"].tolist()
    assert len(f.units) == 8 and len(f.trials) == len(rec["keep"])  # the source's tables came along


def test_predict_co_smooth_and_errors(round_trip, tmp_path, capsys, corpus_dir):
  from ibl_jax import predict
  run = round_trip["run"]
  assert predict.main(["--checkpoint", str(run), "--out", str(tmp_path), "--mode", "co_smooth",
                       "--no-progress"]) == 0
  with np.load(tmp_path / "eid-nwb.npz") as f:
    assert f["rates"].shape[1:] == (100, len(f["uuids"]))
  capsys.readouterr()
  other = corpus_dir / (corpus_dir / "eids.txt").read_text().split()[0]
  assert predict.main(["--checkpoint", str(run), "--sessions", str(other), "--out", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "fine-tune" in err and len(err.splitlines()) == 1

