"""Collect many sessions' evaluation summaries into tables and figures.

  python -m ibl_jax.report --results=results [--out=results/report]

Every `<run>/eval/<eid>/summary.json` below `--results` is one session evaluated by one method; the method is
the run directory's name, or for a run named after its session (a per-session fine-tuning run,
`<method>/<eid>/eval/<eid>/`) the name of the folder above it. Writes `report.csv` (long form: method, task, metric, mean, sem, n_sessions),
`report.md` (one table per metric: methods × tasks, mean ± s.e.m. across sessions, then a `baseline` row — the
smoothing/PSTH baseline of every session — and an `oracle` row when the sessions have true rates; the behaviour
tables, task `behaviour` (linear decoders) and `supervised` (a decoding head), also have `spikes` and `rrr` rows,
and label each reference with its decoding protocol, e.g. `oracle (paper)`), and PNG figures: the bits/spike and
D² tables as images, per-task bits/spike distributions per method, and per-neuron scatter of each pair of methods.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
from ibl_jax.errors import UserError
from ibl_jax import cli

NEURAL_TASKS = ("co_smooth", "forward_pred", "intra_region", "inter_region")
NEURAL_METRICS = {"bps_per_neuron": "bits/spike (mean over neurons)",
                  "bps_pooled": "bits/spike (pooled, NLB)",
                  "d2_mean": "Poisson D² (deviance explained, mean over neurons; IBL BWB)",
                  "r2_psth_mean": "PSTH R²", "r2_trial_mean": "single-trial R²"}
BEHAVIOUR_METRICS = {"choice_accuracy": "choice accuracy", "choice_balanced_accuracy": "choice balanced accuracy",
                     "block_accuracy": "block accuracy", "block_balanced_accuracy": "block balanced accuracy",
                     "whisker_r2": "whisker motion energy R²", "wheel_r2": "wheel speed R²"}
# "behaviour": linear decoders on the frozen model's rates (eval.decoding); "supervised": a fine-tuned decoding head.
BEHAVIOUR_TASKS = ("behaviour", "supervised")
ORACLE = "oracle"
BASELINE = "baseline"  # smoothing + ridge (held-out neurons) / condition PSTH (forward prediction): baselines.py
# Behaviour decoders without the model (ibl_jax/evaluate/decoding.py): on smoothed raw spikes, and reduced-rank
# regression from them to the traces.
SPIKES, RRR = "spikes", "rrr"
REFERENCES = (BASELINE, SPIKES, RRR, ORACLE)  # rows computed per session, not per method: listed after the methods


def collect(results: str | Path) -> dict[str, dict[str, dict]]:
  """{method: {eid: summary}} for every `<method>/eval/<eid>/summary.json` below `results`."""
  out: dict[str, dict[str, dict]] = {}
  for path in sorted(Path(results).rglob("eval/*/summary.json")):
    eid, run_dir = path.parent.name, path.parent.parent.parent
    method = run_dir.parent.name if run_dir.name == eid else run_dir.name
    summary = json.loads(path.read_text())
    summary["_dir"] = str(path.parent)  # where this session's per-neuron .npz files are
    out.setdefault(method, {})[eid] = summary
  return out


def mean_sem(values) -> tuple[float, float, int]:
  """Mean and standard error of the mean over the finite values (s.e.m. = std(ddof=1) / sqrt(n))."""
  x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
  if not x.size:
    return math.nan, math.nan, 0
  sem = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
  return float(x.mean()), sem, int(x.size)


def table_rows(summaries: dict[str, dict[str, dict]]) -> list[dict]:
  """Long-form rows: one per (method, task, metric), plus the oracle as its own method where known."""
  rows = []
  # (reference, task, metric) -> {eid: value}, pooled over methods: the same session's baseline and oracle
  references: dict[tuple[str, str, str], dict[str, float]] = {}
  for method, by_eid in summaries.items():
    tasks = sorted({t for s in by_eid.values() for t in s.get("tasks", {})})
    for task in tasks:
      metrics = BEHAVIOUR_METRICS if task in BEHAVIOUR_TASKS else NEURAL_METRICS
      for metric in metrics:
        values = [s["tasks"].get(task, {}).get(metric) for s in by_eid.values()]
        m, sem, n = mean_sem(values)
        if n:
          rows.append({"method": method, "task": task, "metric": metric, "mean": m, "sem": sem, "n_sessions": n})
        for eid, s in by_eid.items():
          scores = s["tasks"].get(task, {})
          for ref in REFERENCES:
            value = scores.get(f"{ref}_{metric}")
            if value is not None:
              # A behaviour reference depends on the decoding protocol: one row per protocol, never mixed.
              label = f"{ref} ({scores['protocol']})" if scores.get("protocol") else ref
              references.setdefault((label, task, metric), {})[eid] = value
  for (ref, task, metric), by_eid in sorted(references.items(), key=lambda kv: (_reference_rank(kv[0][0]), kv[0])):
    m, sem, n = mean_sem(by_eid.values())
    if n:
      rows.append({"method": ref, "task": task, "metric": metric, "mean": m, "sem": sem, "n_sessions": n})
  return rows


def compare(summaries: dict[str, dict[str, dict]], a: str, b: str, metric: str = "bps_per_neuron") -> list[dict]:
  """Paired comparison of methods a and b per neural task over the sessions both evaluated.

  Per session d = metric(a) − metric(b); reports mean d ± s.e.m., and in how many sessions a > b.
  """
  for m in (a, b):
    if m not in summaries:
      raise UserError(f"--compare: no method {m!r} among {sorted(summaries)}")
  out = []
  for task in NEURAL_TASKS:
    diffs = []
    for eid in sorted(set(summaries[a]) & set(summaries[b])):
      va = summaries[a][eid]["tasks"].get(task, {}).get(metric)
      vb = summaries[b][eid]["tasks"].get(task, {}).get(metric)
      if va is not None and vb is not None and math.isfinite(va) and math.isfinite(vb):
        diffs.append(va - vb)
    if diffs:
      m, sem, n = mean_sem(diffs)
      out.append({"a": a, "b": b, "task": task, "metric": metric, "mean_diff": m, "sem": sem, "n_sessions": n,
                  "a_wins": int(sum(d > 0 for d in diffs))})
  return out


def comparison_markdown(rows: list[dict]) -> str:
  lines = ["### Paired comparisons (bits/spike, mean over neurons; difference = A − B per session)\n",
           "| A | B | task | A − B | sessions A > B | verdict |", "|---|---|---|---|---|---|"]
  for r in rows:
    sem = f" ± {r['sem']:.3f}" if math.isfinite(r["sem"]) else ""
    better = r["mean_diff"] > 0 and (not math.isfinite(r["sem"]) or r["mean_diff"] > 2 * r["sem"])
    worse = r["mean_diff"] < 0 and (not math.isfinite(r["sem"]) or -r["mean_diff"] > 2 * r["sem"])
    verdict = "A better" if better else "B better" if worse else "no clear difference (|diff| ≤ 2 s.e.m.)"
    lines.append(f"| {r['a']} | {r['b']} | {r['task']} | {r['mean_diff']:+.3f}{sem} | {r['a_wins']}/{r['n_sessions']} "
                 f"| {verdict} |")
  return "\n".join(lines) + "\n"


def _cell(row: dict | None) -> str:
  if row is None or not math.isfinite(row["mean"]):
    return "–"
  return f"{row['mean']:.3f} ± {row['sem']:.3f}" if math.isfinite(row["sem"]) else f"{row['mean']:.3f}"


def _reference_rank(label: str) -> int:
  """The position of a reference row ("oracle" or "oracle (paper)") in REFERENCES; -1 for a method."""
  base = label.split(" (")[0]
  return REFERENCES.index(base) if base in REFERENCES else -1


def _method_order(rows: list[dict]) -> list[str]:
  """The methods, sorted, then the baseline and the oracle where present."""
  present = {r["method"] for r in rows}
  refs = sorted((m for m in present if _reference_rank(m) >= 0), key=lambda m: (_reference_rank(m), m))
  return sorted(m for m in present if _reference_rank(m) < 0) + refs


def markdown(rows: list[dict]) -> str:
  """One table per metric: methods (oracle last) × tasks."""
  index = {(r["method"], r["task"], r["metric"]): r for r in rows}
  methods = _method_order(rows)
  n = max((r["n_sessions"] for r in rows), default=0)
  parts = [f"Mean ± s.e.m. across sessions (up to {n} per method).\n"]
  for metrics, tasks in ((NEURAL_METRICS, NEURAL_TASKS), (BEHAVIOUR_METRICS, BEHAVIOUR_TASKS)):
    for metric, title in metrics.items():
      present = [t for t in tasks if any((m, t, metric) in index for m in methods)]
      if not present:
        continue
      parts.append(f"### {title}\n\n| method | " + " | ".join(present) + " |\n|---|" + "---|" * len(present))
      for m in methods:
        if any((m, t, metric) in index for t in present):
          parts.append(f"| {m} | " + " | ".join(_cell(index.get((m, t, metric))) for t in present) + " |")
      parts.append("")
  return "\n".join(parts)


def per_neuron(summaries: dict[str, dict[str, dict]], task: str) -> dict[str, dict[tuple[str, str], float]]:
  """{method: {(eid, uuid): bps}} from the sessions' `<task>.npz` files."""
  out = {}
  for method, by_eid in summaries.items():
    values = {}
    for eid, summary in by_eid.items():
      npz = Path(summary["_dir"]) / f"{task}.npz"
      if npz.exists():
        with np.load(npz) as f:
          if "bps" in f and "uuids" in f:
            values.update({(eid, str(u)): float(b) for u, b in zip(f["uuids"], f["bps"])})
    out[method] = values
  return out


def figures(out: Path, rows: list[dict], summaries: dict) -> list[Path]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  written = []
  # 1. The bits/spike and D² tables as images.
  index = {(r["method"], r["task"], r["metric"]): r for r in rows}
  methods = _method_order(rows)
  for metric, title, name in (("bps_per_neuron", "bits/spike (mean over neurons)", "table_bps.png"),
                              ("d2_mean", "Poisson D² (mean over neurons)", "table_d2.png")):
    cells = [[_cell(index.get((m, t, metric))) for t in NEURAL_TASKS] for m in methods]
    fig, ax = plt.subplots(figsize=(2.2 * len(NEURAL_TASKS) + 2, 0.5 * len(methods) + 1))
    ax.axis("off")
    ax.table(cellText=cells, rowLabels=methods, colLabels=list(NEURAL_TASKS), loc="center").scale(1, 1.4)
    ax.set_title(f"{title}, mean ± s.e.m. across sessions")
    written.append(_save(fig, out / name))
  # 2. Per-task distributions of per-neuron bits/spike, one box per method.
  fig, axes = plt.subplots(1, len(NEURAL_TASKS), figsize=(3.5 * len(NEURAL_TASKS), 3.2), squeeze=False)
  for ax, task in zip(axes[0], NEURAL_TASKS):
    data = per_neuron(summaries, task)
    names = [m for m in data if data[m]]
    if names:
      ax.boxplot([[v for v in data[m].values() if math.isfinite(v)] for m in names], showfliers=False)
      ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right", fontsize=7)
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set_title(task)
    ax.set_ylabel("bits/spike per neuron")
  fig.tight_layout()
  written.append(_save(fig, out / "bps_distributions.png"))
  # 3. Per-neuron scatter, method A vs method B (co-smoothing), for each pair.
  data = per_neuron(summaries, "co_smooth")
  names = sorted(m for m in data if data[m])
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      common = sorted(set(data[a]) & set(data[b]))
      if not common:
        continue
      x, y = np.array([data[a][k] for k in common]), np.array([data[b][k] for k in common])
      fig, ax = plt.subplots(figsize=(3.6, 3.6))
      ax.scatter(x, y, s=6, alpha=0.6)
      lim = [np.nanmin([x, y]), np.nanmax([x, y])]
      ax.plot(lim, lim, color="0.5", lw=0.8)
      ax.set_xlabel(f"{a} (bits/spike)")
      ax.set_ylabel(f"{b} (bits/spike)")
      ax.set_title(f"co-smoothing, {len(common)} neurons", fontsize=9)
      fig.tight_layout()
      written.append(_save(fig, out / f"scatter_{a}_vs_{b}.png"))
  return written


def _save(fig, path: Path) -> Path:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def report(results: str | Path, out: str | Path | None = None, *, make_figures: bool = True,
           comparisons: list[tuple[str, str]] = ()) -> dict:
  results = Path(results)
  summaries = collect(results)
  if not summaries:
    raise UserError(f"no <run>/eval/<eid>/summary.json below {results}; run python -m ibl_jax.evaluate "
                            f"or python -m ibl_jax.finetune first")
  out = Path(out) if out else results / "report"
  out.mkdir(parents=True, exist_ok=True)
  rows = table_rows(summaries)
  with open(out / "report.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["method", "task", "metric", "mean", "sem", "n_sessions"])
    writer.writeheader()
    writer.writerows(rows)
  md = markdown(rows)
  compared = [r for a, b in comparisons for r in compare(summaries, a, b)]
  if compared:
    md += "\n" + comparison_markdown(compared)
  (out / "report.md").write_text(md)
  pngs = figures(out, rows, summaries) if make_figures else []
  return {"rows": rows, "markdown": md, "figures": [str(p) for p in pngs], "out": str(out), "comparisons": compared}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ibl_jax.report", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--results", required=True, help="directory searched for <run>/eval/<eid>/summary.json")
  parser.add_argument("--out", default=None, help="output directory (default: RESULTS/report)")
  parser.add_argument("--no-figures", action="store_true", help="tables only")
  parser.add_argument("--compare", action="append", default=[], metavar="A:B",
                      help="paired per-session comparison of methods A and B on the neural tasks (repeatable)")
  cli.add_verbosity_flag(parser)
  args = parser.parse_args(argv)
  cli.quiet_logs(args.verbosity)
  try:
    pairs = [tuple(c.split(":", 1)) for c in args.compare]
    if any(len(p) != 2 for p in pairs):
      raise UserError(f"--compare takes A:B, got {args.compare}")
    result = report(args.results, args.out, make_figures=not args.no_figures, comparisons=pairs)
  except (UserError, FileNotFoundError) as e:
    print(f"error: {cli.one_line(e)}", file=sys.stderr)
    return 2
  print(result["markdown"])
  print(f"wrote {result['out']}/report.csv, report.md and {len(result['figures'])} figures")
  return 0


if __name__ == "__main__":
  sys.exit(main())
