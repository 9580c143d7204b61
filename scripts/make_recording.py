"""Write a synthetic IBL-like recording as an ONE cache folder (ALF) and/or an NWB file, to measure `prepare`.

  python scripts/make_recording.py --out /tmp/rec --minutes 60 --units 700 --trials 700
  /usr/bin/time -v python -m ibl_jax.data prepare alf /tmp/rec/cortexlab/Subjects/SYN/2024-01-01/001 --out /tmp/p1
  /usr/bin/time -v python -m ibl_jax.data prepare nwb /tmp/rec/recording.nwb --out /tmp/p2

Units fire as Poisson processes (log-normal rates, median 6 Hz) split over two probes, all labelled good;
trials come every minutes·60/trials seconds with IBL-like timings; wheel position at 1 kHz, left-camera
motion energy at 60 Hz. Layout: DANDI 000409's names in the NWB file, ONE's file names in the folder.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import numpy as np
import pandas as pd

ALLEN_IDS = np.array([385, 409, 382, 10703, 632, 1020])  # VISp, VISl, CA1, DG-mo, DG-sg, PO
ACRONYMS = {385: "VISp", 409: "VISl", 382: "CA1", 10703: "DG-mo", 632: "DG-sg", 1020: "PO"}


def simulate(minutes: float, n_units: int, n_trials: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  end = 60.0 * minutes
  rates = np.exp(rng.normal(np.log(6.0), 0.8, n_units))
  probes = []
  for p, units in enumerate(np.array_split(np.arange(n_units), 2)):
    counts = rng.poisson(rates[units] * end)
    times = rng.uniform(0, end, counts.sum())
    clusters = np.repeat(np.arange(len(units)), counts)
    order = np.argsort(times, kind="stable")
    channel_ids = rng.choice(ALLEN_IDS, 384)
    probes.append({"name": f"probe0{p}", "times": times[order], "clusters": clusters[order].astype(np.uint32),
                   "channels": rng.integers(0, 384, len(units)), "channel_ids": channel_ids,
                   "depths": rng.uniform(0, 3840, len(units)).round(1), "label": np.ones(len(units)),
                   "uuids": [f"{p}-{u:04d}-synthetic" for u in range(len(units))]})
  period = end / (n_trials + 1)
  stim_on = period * (0.5 + np.arange(n_trials)) + rng.uniform(0, 0.5, n_trials)
  fm = stim_on + rng.uniform(0.1, 0.8, n_trials)
  trials = {"intervals_0": stim_on - 0.8, "intervals_1": stim_on + period - 1.0, "stimOn_times": stim_on,
            "goCue_times": stim_on + 0.01, "firstMovement_times": fm, "feedback_times": fm + 0.2,
            "choice": rng.choice([-1.0, 1.0], n_trials), "feedbackType": rng.choice([-1.0, 1.0], n_trials, p=[.2, .8]),
            "probabilityLeft": rng.choice([0.2, 0.5, 0.8], n_trials)}
  wheel_t = np.arange(0, end, 0.001)
  me_t = np.arange(0, end, 1 / 60)
  return {"probes": probes, "trials": trials, "wheel": (wheel_t, np.cumsum(rng.normal(0, 1e-3, len(wheel_t)))),
          "me": (me_t, np.abs(rng.normal(1.0, 0.3, len(me_t))))}


def write_alf(rec: dict, root: Path) -> Path:
  session = root / "cortexlab" / "Subjects" / "SYN" / "2024-01-01" / "001"
  alf = session / "alf"
  for p in rec["probes"]:
    d = alf / p["name"] / "pykilosort"
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "spikes.times.npy", p["times"])
    np.save(d / "spikes.clusters.npy", p["clusters"])
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
              "probabilityLeft": "probability_left", "goCue_times": "go_cue_time"}


def write_nwb(rec: dict, path: Path) -> Path:
  from pynwb import NWBHDF5IO, NWBFile, TimeSeries  # pylint: disable=g-import-not-at-top
  from pynwb.behavior import CompassDirection, SpatialSeries  # pylint: disable=g-import-not-at-top
  f = NWBFile(session_description="synthetic recording", identifier="synthetic", session_id="synthetic-eid",
              session_start_time=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc), lab="cortexlab")
  device = f.create_device("neuropixels")
  offset = 0
  f.add_unit_column("label", "QC: fraction of metrics passed")
  f.add_unit_column("uuid", "unit id")
  f.add_unit_column("mean_relative_depth", "depth, µm")
  for p in rec["probes"]:
    group = f.create_electrode_group(p["name"], description="", location="brain", device=device)
    for cid in p["channel_ids"]:
      f.add_electrode(location=ACRONYMS[int(cid)], group=group)
    order = np.argsort(p["clusters"], kind="stable")
    bounds = np.searchsorted(p["clusters"][order], np.arange(len(p["label"]) + 1))
    for c in range(len(p["label"])):
      f.add_unit(spike_times=p["times"][order[bounds[c]:bounds[c + 1]]], electrodes=[offset + int(p["channels"][c])],
                 label=p["label"][c], uuid=p["uuids"][c], mean_relative_depth=p["depths"][c])
    offset += len(p["channel_ids"])
  for name in NWB_TRIALS.values():
    f.add_trial_column(name, name)
  t = rec["trials"]
  for k in range(len(t["stimOn_times"])):
    f.add_trial(start_time=t["intervals_0"][k], stop_time=t["intervals_1"][k],
                **{name: t[field][k] for field, name in NWB_TRIALS.items()})
  behavior = f.create_processing_module("behavior", "behaviour")
  compass = CompassDirection(name="CompassDirection")
  compass.add_spatial_series(SpatialSeries(name="WheelPositionSeries", data=rec["wheel"][1],
                                           timestamps=rec["wheel"][0], reference_frame="wheel", unit="radians"))
  behavior.add(compass)
  behavior.add(TimeSeries(name="LeftCameraMotionEnergy", data=rec["me"][1], timestamps=rec["me"][0], unit="a.u."))
  with NWBHDF5IO(str(path), "w") as io:
    io.write(f)
  return path


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, type=Path)
  p.add_argument("--minutes", type=float, default=60.0)
  p.add_argument("--units", type=int, default=700)
  p.add_argument("--trials", type=int, default=700)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--formats", default="alf,nwb", help="alf, nwb or both")
  args = p.parse_args()
  rec = simulate(args.minutes, args.units, args.trials, args.seed)
  args.out.mkdir(parents=True, exist_ok=True)
  n_spikes = sum(len(p["times"]) for p in rec["probes"])
  print(f"{args.units} units, {n_spikes} spikes, {args.trials} trials over {args.minutes} min")
  if "alf" in args.formats:
    print(f"ALF: {write_alf(rec, args.out)}")
  if "nwb" in args.formats:
    print(f"NWB: {write_nwb(rec, args.out / 'recording.nwb')}")


if __name__ == "__main__":
  main()
