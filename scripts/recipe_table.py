"""The recipe table: session size × {baseline, MtM from scratch, MtM fine-tuned, oracle}, co-smoothing bps and D².

  python scripts/recipe_table.py --runs scratch=results/small_scratch,finetuned=results/small_ft [--out table.md]

Each run is a fine-tuning (or from-scratch) run directory evaluated by `python -m ibl_jax.finetune`; the baseline
and oracle come from its `eval/<eid>/summary.json` (the baseline is computed here for summaries written before
it existed). One row per session: its training trials and neurons, then each method's bits/spike and D².
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ibl_jax import baselines, metrics
from ibl_jax.data import sessions as sessions_lib
from ibl_jax.evaluate import tasks


def _baseline(session) -> tuple[float, float]:
  fit = np.concatenate([session.splits[s].spikes for s in ("train", "val")]).astype(np.float64)
  test = session.splits["test"]
  spec = tasks.leave_out("co_smooth", session.regions, test.spikes.shape[1])
  rates, _ = baselines.heldout_baseline(fit, test.spikes, spec.keep_VxN, spec.target_VxN)
  return metrics.bps_per_neuron(rates, test.spikes), metrics.d2_mean(rates, test.spikes)


def table(runs: dict[str, Path]) -> str:
  rows = {}
  for name, run_dir in runs.items():
    config = json.loads((run_dir / "config.json").read_text())
    for path in sorted((run_dir / "eval").glob("*/summary.json")):
      cs = json.loads(path.read_text())["tasks"]["co_smooth"]
      row = rows.setdefault(path.parent.name, {"source": config["data"]["sessions"]})
      row[name] = (cs["bps_per_neuron"], cs.get("d2_mean"))
      row["oracle"] = (cs.get("oracle_bps_per_neuron"), cs.get("oracle_d2_mean"))
      if cs.get("baseline_bps_per_neuron") is not None:
        row["baseline"] = (cs["baseline_bps_per_neuron"], cs["baseline_d2_mean"])
  methods = ["baseline", *runs, "oracle"]
  lines = ["| session | train trials | neurons | " + " | ".join(f"{m} bps / D²" for m in methods) + " |",
           "|---|---|---|" + "---|" * len(methods)]
  for eid, row in rows.items():
    src = Path(row["source"]).parent / eid if Path(row["source"]).is_file() else Path(row["source"])
    session = sessions_lib.load_session(str(src), with_true_rates=True)
    if "baseline" not in row:
      row["baseline"] = _baseline(session)
    cell = lambda v: "–" if v is None or v[0] is None else f"{v[0]:.3f} / {v[1]:.3f}" if v[1] is not None else f"{v[0]:.3f}"
    lines.append(f"| {eid[:8]} | {session.splits['train'].spikes.shape[0]} | {session.num_neurons} | "
                 + " | ".join(cell(row.get(m)) for m in methods) + " |")
  return "\n".join(lines) + "\n"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--runs", required=True, help="comma list of NAME=RUN_DIR")
  p.add_argument("--out", default=None)
  args = p.parse_args()
  runs = {k: Path(v) for k, v in (item.split("=", 1) for item in args.runs.split(","))}
  md = table(runs)
  print(md)
  if args.out:
    Path(args.out).write_text(md)


if __name__ == "__main__":
  main()
