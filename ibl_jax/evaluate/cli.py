"""`python -m ibl_jax.evaluate`: the command line of the evaluation suite."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence


import ibl_jax.evaluate as evaluate_pkg
from ibl_jax.evaluate.suite import evaluate_run
from ibl_jax.evaluate.tasks import TASKS
from ibl_jax.errors import UserError
from ibl_jax import cli

# ---------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m ibl_jax.evaluate", description=evaluate_pkg.__doc__.split("\n\n")[0],
                              epilog="Writes OUT/<eid>/<task>.npz, OUT/<eid>/summary.json and OUT/<eid>/figures/.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True,
                 help="run directory (its best checkpoint) or RUN_DIR/checkpoints/<step>")
  p.add_argument("--sessions", default=None,
                 help="sessions to evaluate: a directory, an eids file or a comma list (default: the sessions the "
                      "checkpoint was trained on); each needs stitching in the checkpoint")
  p.add_argument("--tasks", default=None, help=f"comma list from {','.join(TASKS)} (default: the run's eval.tasks)")
  p.add_argument("--out", default=None, help="output root (default: RUN_DIR/eval)")
  p.add_argument("--chunk-size", type=int, default=None,
                 help="held-out inputs per compiled forward call (default: the run's eval.chunk_size; "
                      "0: automatic, sized to the model's activations per device: CPU cache or accelerator memory)")
  p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=None,
                 help="write figures (default: the run's eval.figures)")
  p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                 help="also score the smoothing/PSTH baseline of every neural task (default: the run's eval.baseline)")
  p.add_argument("--decoding", choices=("ours", "paper"), default=None,
                 help="behaviour decoding protocol (default: the run's eval.decoding): ours, or the MtM paper's")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  return p


def _line(task: str, s: dict) -> str:
  fmt = lambda key: "  n/a" if s.get(key) is None or not math.isfinite(s[key]) else f"{s[key]:.3f}"
  if task == "behaviour":
    return (f"choice acc {fmt('choice_accuracy')} (oracle {fmt('oracle_choice_accuracy')}, chance "
            f"{fmt('choice_chance')})  block acc {fmt('block_accuracy')} (oracle {fmt('oracle_block_accuracy')}, "
            f"chance {fmt('block_chance')})  whisker R² {fmt('whisker_r2')} ({fmt('oracle_whisker_r2')})  wheel R² "
            f"{fmt('wheel_r2')} ({fmt('oracle_wheel_r2')}); raw spikes: choice {fmt('spikes_choice_accuracy')} "
            f"whisker {fmt('spikes_whisker_r2')} (RRR {fmt('rrr_whisker_r2')}) wheel {fmt('spikes_wheel_r2')} "
            f"(RRR {fmt('rrr_wheel_r2')})")
  if task == "supervised":
    return "  ".join(f"{k} {fmt(k)}" for k in s if k.endswith(("accuracy", "_r2")))
  trio = lambda key: f"{fmt(key)} (baseline {fmt('baseline_' + key)}, oracle {fmt('oracle_' + key)})"
  return (f"bps per neuron {trio('bps_per_neuron')}  D² {trio('d2_mean')}  pooled bps {fmt('bps_pooled')}  "
          f"PSTH R² {fmt('r2_psth_mean')}  trial R² {fmt('r2_trial_mean')}")


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  cli.add_verbosity_flag(parser)
  args = parser.parse_args(argv)
  cli.quiet_logs(args.verbosity)
  if not args.verbosity:
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on opening a checkpoint read-only
  cli.split_cpu_like_run(args.checkpoint)
  try:
    summaries = evaluate_run(args.checkpoint, sessions=args.sessions, tasks=args.tasks, out_dir=args.out,
                             chunk_size=args.chunk_size, figures=args.figures, baseline=args.baseline,
                             progress=not args.no_progress, decoding=args.decoding)
  except (UserError, FileNotFoundError) as e:
    print(f"error: {cli.one_line(e)}", file=sys.stderr)
    return 2
  for eid, summary in summaries.items():
    print(f"session {eid} ({summary['n_neurons']} neurons, {summary['n_trials']} test trials)")
    for task, scores in summary["tasks"].items():
      print(f"  {task:<13} {_line(task, scores)}  [{scores['wall_s']:.1f} s]")
  return 0
