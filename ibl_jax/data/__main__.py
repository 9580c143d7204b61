"""Inspect sessions and generate the synthetic corpus.

  python -m ibl_jax.data info PATH_OR_ID [--json]
  python -m ibl_jax.data synthetic --out data/synthetic [--sessions 6 --test-sessions 1 --seed 0]
  python -m ibl_jax.data synthetic --out data/small --sessions 4 --test-sessions 3 --seed 1 --brain-seed 0 \
      --min-trials 60 --max-trials 85 --min-neurons 100 --max-neurons 200     # small sessions, same brain
  python -m ibl_jax.data prepare alf SESSION_DIR --out OUT [--regions allen|beryl|cosmos --qc 1|all --unaligned]
  python -m ibl_jax.data prepare nwb FILE.nwb --out OUT [--column stimOn_times=NAME ... --region-column NAME]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from ibl_jax.data import schema
from ibl_jax.errors import UserError
from ibl_jax import cli


def session_info(source: str, *, cache_dir: str | None = None) -> dict:
  """Per-split counts and rates, regions with neuron counts and the behaviours present, as a dict."""
  from ibl_jax.data.sessions import load_session  # pylint: disable=g-import-not-at-top
  s = load_session(source, cache_dir=cache_dir)
  splits = {}
  for name, split in s.splits.items():
    K, T, N = split.spikes.shape
    total = int(split.spikes.sum(dtype=np.int64))
    splits[name] = {"trials": K, "T": T, "N": N, "total_spikes": total,
                    "mean_rate_hz": total / max(K * T * N, 1) / schema.BINSIZE_S}
  regions, counts = np.unique(s.regions, return_counts=True)
  behaviours = sorted(set().union(*(sp.behaviour.keys() for sp in s.splits.values())),
                      key=schema.BEHAVIOURS.index)
  return {"eid": s.eid, "source": s.source, "splits": splits,
          "regions": {str(r): int(c) for r, c in zip(regions, counts)}, "behaviours": behaviours}


def _print_info(info: dict) -> None:
  print(f"session {info['eid']}  ({info['source']})")
  print(f"  {'split':<6} {'trials':>7} {'T':>4} {'N':>5} {'spikes':>10} {'rate (Hz)':>10}")
  for name, sp in info["splits"].items():
    print(f"  {name:<6} {sp['trials']:>7} {sp['T']:>4} {sp['N']:>5} {sp['total_spikes']:>10} "
          f"{sp['mean_rate_hz']:>10.2f}")
  print("  regions:    " + ", ".join(f"{r} ({n})" for r, n in info["regions"].items()))
  print("  behaviours: " + (", ".join(info["behaviours"]) or "none (unaligned session)"))


def _add_prepare(sub) -> None:
  p = sub.add_parser("prepare", help="bin your own recording (IBL ALF folder or NWB file) into a session")
  kinds = p.add_subparsers(dest="kind", required=True)
  for kind, what in (("alf", "an IBL session folder as ONE caches it: <lab>/Subjects/<subject>/<date>/<number>"),
                     ("nwb", "an NWB file (DANDI 000409's IBL column names by default)")):
    k = kinds.add_parser(kind, help=what)
    k.add_argument("source", help=what)
    k.add_argument("--out", required=True, help="the session directory to write (renamed into place at the end)")
    k.add_argument("--align", default="stimOn_times", help="trial event the window is aligned to "
                   "(stimOn_times, firstMovement_times, feedback_times, ...; default stimOn_times)")
    k.add_argument("--qc", default="1", help="keep units whose QC label is >= this (default 1: IBL 'good'); "
                   "'all' keeps every unit")
    k.add_argument("--regions", default="allen", choices=("allen", "beryl", "cosmos"),
                   help="region acronyms: Allen (default, as the original stores them), Beryl or Cosmos")
    k.add_argument("--unaligned", action="store_true",
                   help="consecutive 2 s chunks of the whole recording, spikes and neuron metadata only")
    k.add_argument("--seed", type=int, default=0, help="seed of the 70/10/20 train/val/test permutation")
    k.add_argument("--eid", default=None, help="session id written into the rows (default: from the source)")
    k.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    if kind == "alf":
      k.add_argument("--sorter", default=None, help="spike sorter sub-folder when a probe has several")
    else:
      k.add_argument("--column", action="append", default=[], metavar="FIELD=NAME",
                     help="trials column for one of our fields, e.g. stimOn_times=stim_on_time (repeatable)")
      k.add_argument("--region-column", default=None, help="units column holding region acronyms (default: "
                     "the units' electrodes' location, else allen_location)")
      k.add_argument("--qc-column", default=None, help="units column holding the QC label (default label)")
      k.add_argument("--depth-column", default=None, help="units column holding depth in µm "
                     "(default mean_relative_depth)")
      k.add_argument("--uuid-column", default=None, help="units column holding unit ids (default uuid)")
      k.add_argument("--wheel", default=None, help="wheel position series as module/name[/series] "
                     "(default behavior/CompassDirection/WheelPositionSeries)")
      k.add_argument("--motion-energy", default=None, help="whisker motion energy series as module/name "
                     "(default behavior/LeftCameraMotionEnergy, else RightCameraMotionEnergy)")


def _prepare(args) -> None:
  from ibl_jax.data import prepare  # pylint: disable=g-import-not-at-top
  qc = None if args.qc == "all" else _float(args.qc, "--qc")
  protocol = prepare.Protocol(align=args.align, qc=qc, seed=args.seed, unaligned=args.unaligned)
  if args.kind == "alf":
    from ibl_jax.data.alf import read_alf  # pylint: disable=g-import-not-at-top
    rec = read_alf(args.source, regions=args.regions, sorter=args.sorter, eid=args.eid)
    options = {"reader": "alf", "regions": args.regions, "sorter": args.sorter}
  else:
    from ibl_jax.data.nwb import read_nwb  # pylint: disable=g-import-not-at-top
    columns = {}
    for item in args.column:
      field, sep, name = item.partition("=")
      if not sep or not field or not name:
        raise prepare.PrepareError(f"--column {item!r}: expected FIELD=NAME, e.g. stimOn_times=stim_on_time")
      columns[field] = name
    rec = read_nwb(args.source, regions=args.regions, region_column=args.region_column, qc_column=args.qc_column,
                   depth_column=args.depth_column, uuid_column=args.uuid_column, trial_columns=columns,
                   wheel=args.wheel, motion_energy=args.motion_energy, eid=args.eid, need_trials=not args.unaligned)
    options = {"reader": "nwb", "regions": args.regions, "columns": columns}
  info = prepare.prepare(rec, args.out, protocol, provenance=options, overwrite=args.overwrite)
  print(f"wrote {args.out}: session {info['eid']}, {info['n_trials']} {'chunks' if args.unaligned else 'trials'} "
        f"({', '.join(f'{k} {v}' for k, v in info['splits'].items())}), {info['n_units']} units, "
        f"behaviours: {', '.join(info['behaviours']) or 'none'}")


def _float(text: str, flag: str) -> float:
  try:
    return float(text)
  except ValueError:
    from ibl_jax.data.prepare import PrepareError  # pylint: disable=g-import-not-at-top
    raise PrepareError(f"{flag} must be a number or 'all', not {text!r}") from None


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ibl_jax.data", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p_info = sub.add_parser("info", help="summarise one session: trials, T, N, spikes, rates, regions, behaviours")
  p_info.add_argument("source", help="a directory written by DatasetDict.save_to_disk, or a hub id")
  p_info.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  p_info.add_argument("--cache-dir", default=None, help="cache directory for hub ids")
  p_syn = sub.add_parser("synthetic", help="write the synthetic IBL-like corpus (with true rates)")
  p_syn.add_argument("--out", required=True, help="output directory (one sub-directory per session)")
  p_syn.add_argument("--sessions", type=int, default=6, help="number of sessions in all (default 6)")
  p_syn.add_argument("--test-sessions", type=int, default=1,
                     help="sessions held out from pretraining, listed in test_eids.txt (default 1)")
  p_syn.add_argument("--seed", type=int, default=0)
  p_syn.add_argument("--min-neurons", type=int, default=40)
  p_syn.add_argument("--max-neurons", type=int, default=160)
  p_syn.add_argument("--min-trials", type=int, default=200)
  p_syn.add_argument("--max-trials", type=int, default=300,
                     help="trials per session are drawn from [min, max]; 70%% train, 10%% val, 20%% test")
  p_syn.add_argument("--brain-seed", type=int, default=None,
                     help="seed of the latent dynamics (default --seed): another --seed with the same brain gives "
                          "new sessions of the pretraining corpus's brain, e.g. small sessions (--min-trials 60 "
                          "--max-trials 85 --min-neurons 100 --max-neurons 200: 40-60 training trials)")
  p_syn.add_argument("--no-true-rates", dest="true_rates", action="store_false",
                     help="leave out the float32 true_rates column (4x the counts' size): for large corpora")
  p_syn.add_argument("--workers", type=int, default=1, help="processes simulating and writing sessions (default 1)")
  _add_prepare(sub)
  cli.add_verbosity_flag(parser)
  args = parser.parse_args(argv)
  cli.quiet_logs(args.verbosity)
  try:
    if args.command == "prepare":
      _prepare(args)
    elif args.command == "info":
      info = session_info(args.source, cache_dir=args.cache_dir)
      print(json.dumps(info)) if args.json else _print_info(info)
    else:
      from ibl_jax.data import synthetic  # pylint: disable=g-import-not-at-top
      eids = synthetic.write_corpus(args.out, n_sessions=args.sessions, n_test_sessions=args.test_sessions,
                                    seed=args.seed, min_neurons=args.min_neurons, max_neurons=args.max_neurons,
                                    min_trials=args.min_trials, max_trials=args.max_trials,
                                    true_rates=args.true_rates, workers=args.workers,
                                    brain_seed=args.brain_seed)
      print(f"wrote {len(eids)} sessions to {args.out} (eids.txt, train_eids.txt, test_eids.txt)")
  except (UserError, FileNotFoundError) as e:
    print(f"error: {cli.one_line(e)}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
