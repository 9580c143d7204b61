"""Inspect sessions and generate the synthetic corpus.

  python -m ibl_jax.data info PATH_OR_ID [--json]
  python -m ibl_jax.data synthetic --out data/synthetic [--sessions 6 --test-sessions 1 --seed 0]
  python -m ibl_jax.data synthetic --out data/small --sessions 4 --test-sessions 3 --seed 1 --brain-seed 0 \
      --min-trials 60 --max-trials 85 --min-neurons 100 --max-neurons 200     # small sessions, same brain
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from ibl_jax.data import schema
from ibl_jax.errors import UserError


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
  args = parser.parse_args(argv)
  try:
    if args.command == "info":
      info = session_info(args.source, cache_dir=args.cache_dir)
      print(json.dumps(info)) if args.json else _print_info(info)
    else:
      from ibl_jax.data import synthetic  # pylint: disable=g-import-not-at-top
      eids = synthetic.write_corpus(args.out, n_sessions=args.sessions, n_test_sessions=args.test_sessions,
                                    seed=args.seed, min_neurons=args.min_neurons, max_neurons=args.max_neurons,
                                    min_trials=args.min_trials, max_trials=args.max_trials,
                                    brain_seed=args.brain_seed)
      print(f"wrote {len(eids)} sessions to {args.out} (eids.txt, train_eids.txt, test_eids.txt)")
  except (UserError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
