"""The report on hand-written summaries: table values computed by hand, files written."""

import csv
import json
import math

import numpy as np

from ibl_jax import report


def _write(root, method, eid, tasks, uuids=None, bps=None):
  d = root / method / "eval" / eid
  d.mkdir(parents=True)
  (d / "summary.json").write_text(json.dumps({"eid": eid, "tasks": tasks}))
  if bps is not None:
    np.savez(d / "co_smooth.npz", bps=np.asarray(bps), uuids=np.asarray(uuids), regions=np.asarray(["CA1"] * len(bps)))


def test_report_tables_match_hand_computed_values(tmp_path):
  # Method mtm: co_smooth bps 0.2 and 0.4 on two sessions -> mean 0.3, sem = std([.2,.4], ddof=1)/sqrt(2) = 0.1.
  # D² and the baseline: mtm's d2 0.1 and 0.3 -> 0.2 ± 0.1; the baseline 0.15 (s1), 0.05 (s2) -> 0.1 ± 0.05.
  _write(tmp_path, "mtm", "s1", {"co_smooth": {"bps_per_neuron": 0.2, "bps_pooled": 0.25, "oracle_bps_per_neuron": 0.5,
                                               "d2_mean": 0.1, "baseline_bps_per_neuron": 0.15,
                                               "baseline_d2_mean": 0.15},
                                 "behaviour": {"choice_accuracy": 0.8}}, ["a", "b"], [0.1, 0.3])
  _write(tmp_path, "mtm", "s2", {"co_smooth": {"bps_per_neuron": 0.4, "bps_pooled": 0.45, "oracle_bps_per_neuron": 0.7,
                                               "d2_mean": 0.3, "baseline_bps_per_neuron": 0.05,
                                               "baseline_d2_mean": 0.05},
                                 "behaviour": {"choice_accuracy": 0.9}}, ["c"], [0.4])
  # Method temporal: one session only -> no s.e.m.; a None (non-finite) value is skipped.
  # A per-session fine-tuning run (<method>/<eid>/eval/<eid>) belongs to the method of the folder above.
  _write(tmp_path / "temporal", "s1", "s1", {"co_smooth": {"bps_per_neuron": 0.1, "bps_pooled": None}},
         ["a", "b"], [0.0, 0.2])
  result = report.report(tmp_path, tmp_path / "out", comparisons=[("mtm", "temporal")])
  rows = {(r["method"], r["task"], r["metric"]): r for r in result["rows"]}
  r = rows[("mtm", "co_smooth", "bps_per_neuron")]
  assert math.isclose(r["mean"], 0.3) and math.isclose(r["sem"], 0.1) and r["n_sessions"] == 2
  assert math.isclose(rows[("mtm", "behaviour", "choice_accuracy")]["mean"], 0.85)
  o = rows[("oracle", "co_smooth", "bps_per_neuron")]
  assert math.isclose(o["mean"], 0.6) and math.isclose(o["sem"], 0.1)
  d = rows[("mtm", "co_smooth", "d2_mean")]
  assert math.isclose(d["mean"], 0.2) and math.isclose(d["sem"], 0.1)
  b = rows[("baseline", "co_smooth", "d2_mean")]
  assert math.isclose(b["mean"], 0.1) and math.isclose(b["sem"], 0.05) and b["n_sessions"] == 2
  t = rows[("temporal", "co_smooth", "bps_per_neuron")]
  assert t["mean"] == 0.1 and math.isnan(t["sem"]) and ("temporal", "co_smooth", "bps_pooled") not in rows
  md = (tmp_path / "out" / "report.md").read_text()
  assert "| mtm | 0.300 ± 0.100 |" in md and "| oracle | 0.600 ± 0.100 |" in md and "| temporal | 0.100 |" in md
  assert "| baseline | 0.100 ± 0.050 |" in md and "Poisson D²" in md
  assert md.index("| temporal |") < md.index("| baseline |") < md.index("| oracle |")  # references last
  # Paired over the one common session s1: 0.2 - 0.1 = +0.1, mtm wins 1/1.
  (cmp,) = result["comparisons"]
  assert cmp["task"] == "co_smooth" and math.isclose(cmp["mean_diff"], 0.1) and cmp["a_wins"] == 1
  assert "| mtm | temporal | co_smooth | +0.100 | 1/1 | A better |" in md
  with open(tmp_path / "out" / "report.csv") as f:
    assert len(list(csv.DictReader(f))) == len(result["rows"])
  names = sorted(p.rsplit("/", 1)[1] for p in result["figures"])
  assert names == ["bps_distributions.png", "scatter_mtm_vs_temporal.png", "table_bps.png", "table_d2.png"]


def test_report_without_summaries_is_a_clear_error(tmp_path, capsys):
  assert report.main(["--results", str(tmp_path)]) == 2
  assert "no <run>/eval/<eid>/summary.json below" in capsys.readouterr().err


def test_behaviour_references_are_kept_apart_by_protocol_and_the_head_is_a_task(tmp_path):
  # The same session decoded with both protocols: its oracle and raw-spike rows must not mix (0.5 vs 0.7).
  _write(tmp_path, "ours", "s1", {"behaviour": {"protocol": "ours", "wheel_r2": 0.4, "oracle_wheel_r2": 0.5,
                                                "spikes_wheel_r2": 0.2, "rrr_wheel_r2": 0.6}})
  _write(tmp_path, "paper", "s1", {"behaviour": {"protocol": "paper", "wheel_r2": 0.6, "oracle_wheel_r2": 0.7,
                                                 "spikes_wheel_r2": 0.65, "rrr_wheel_r2": 0.6}})
  _write(tmp_path, "head", "s1", {"supervised": {"wheel_r2": 0.3, "block_balanced_accuracy": 0.4}})
  rows = {(r["method"], r["task"], r["metric"]): r["mean"] for r in report.table_rows(report.collect(tmp_path))}
  assert rows[("oracle (ours)", "behaviour", "wheel_r2")] == 0.5 and rows[("oracle (paper)", "behaviour",
                                                                          "wheel_r2")] == 0.7
  assert rows[("spikes (paper)", "behaviour", "wheel_r2")] == 0.65
  assert rows[("head", "supervised", "block_balanced_accuracy")] == 0.4
  md = report.markdown(report.table_rows(report.collect(tmp_path)))
  assert md.index("| paper |") < md.index("| spikes (ours) |") < md.index("| rrr (ours) |") < md.index("| oracle (ours)")
