"""Start-up time, peak memory and training throughput with and without the array cache (docs/design.md §3).

  python -m ibl_jax.data synthetic --out /tmp/c256 --sessions 256 --test-sessions 0 --no-true-rates --workers 2 \
      --min-neurons 150 --max-neurons 150 --min-trials 150 --max-trials 150
  nice python scripts/measure_cache.py --corpus /tmp/c256 --sizes 8,64,256 --out /tmp/measure

For each size S (the first S sessions of eids.txt), each in a fresh process: the corpus's cold start-up (building
the cache), its warm start-up (memory maps), and a short training run (default 20 steps of the small model) on
the warm cache and with the cache off (everything decoded into memory, as before the cache). Writes
`results.json` and prints a Markdown table. Peak RSS is the process's high-water mark (`ru_maxrss`); RssAnon and
RssFile are read at the end (file-backed pages of the maps are shared page cache, reclaimable).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status_mb() -> dict:
  out = {}
  for line in Path("/proc/self/status").read_text().splitlines():
    key, _, value = line.partition(":")
    if key in ("RssAnon", "RssFile", "VmHWM"):
      out[key] = int(value.split()[0]) / 1024
  return out


def _child_startup(args) -> dict:
  from ibl_jax.data import sessions  # pylint: disable=g-import-not-at-top
  t, c = time.perf_counter(), time.process_time()
  corpus = sessions.load_corpus(args.sessions, array_cache=args.array_cache, with_true_rates=True)
  return {"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c, "sessions": len(corpus.sessions)}


def _child_batches(args) -> dict:
  """The data layer alone, as training drives it: the corpus, `steps` training batches, the validation batches."""
  from ibl_jax.data import batches, sessions  # pylint: disable=g-import-not-at-top
  t, c = time.perf_counter(), time.process_time()
  corpus = sessions.load_corpus(args.sessions, array_cache=args.array_cache, with_true_rates=True)
  it = batches.BatchIterator(corpus, "train", 16, seed=0)
  t_batches = time.perf_counter()
  for _ in range(args.steps):
    next(it)
  per_batch = (time.perf_counter() - t_batches) / args.steps
  for _ in batches.sequential_batches(corpus, "val", 16, max_batches=1):
    pass
  held = {f"{k}_with_corpus": v for k, v in _status_mb().items() if k != "VmHWM"}  # before the maps are dropped
  return {"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c, "batch_ms": 1e3 * per_batch, **held}


def _child_train(args) -> dict:
  from ibl_jax import parallel, train  # pylint: disable=g-import-not-at-top
  from ibl_jax.configs import config_module  # pylint: disable=g-import-not-at-top
  c = config_module("ndt1").get_config()
  parallel.set_cpu_devices(c.mesh.cpu_devices)
  c.data.sessions, c.data.array_cache = args.sessions, args.array_cache
  c.results_dir = str(Path(args.out) / "runs")
  for kv in args.set:  # as --config.a.b=value
    field, value = kv.split("=", 1)
    *path, leaf = field.split(".")
    node = c
    for name in path:
      node = node[name]
    node[leaf] = type(node[leaf])(value)
  c.run_name = f"{Path(args.sessions).stem}-{'off' if args.array_cache == 'off' else 'cache'}"
  shutil.rmtree(Path(c.results_dir) / c.run_name, ignore_errors=True)
  t = c.training
  t.num_steps, t.log_every, t.eval_every, t.checkpoint_every, t.eval_batches = args.steps, 5, args.steps, args.steps, 1
  t0, c0 = time.perf_counter(), time.process_time()
  summary = train.train_and_evaluate(c)
  logs = [json.loads(line) for line in (Path(c.results_dir) / c.run_name / "metrics.jsonl").read_text().splitlines()]
  rates = [r["trials_per_s"] for r in logs if r["kind"] == "train" and "trials_per_s" in r][1:]  # first: compile
  saved = json.loads((Path(c.results_dir) / c.run_name / "corpus.json").read_text())
  return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "batch_size": summary["batch_size"],
          "trials_per_s": sorted(rates)[len(rates) // 2] if rates else None,
          "params": _param_count(c.model, len(saved["eids"]), max(saved["num_neurons"]))}


def _param_count(model_config, num_sessions: int, n_max: int) -> int:
  """The model's parameters (the stitching rows grow with the sessions): params, grads and AdamW's two moments
  are four float32 copies, memory that grows with S whatever the data layer does."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ibl_jax import steps as steps_lib  # pylint: disable=g-import-not-at-top
  _, abstract = steps_lib.split_params(nnx.eval_shape(
      lambda: steps_lib.build_model(model_config, num_sessions=num_sessions, n_max=n_max)))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract)))


def _run_child(kind: str, sessions: str, array_cache: str, args) -> dict:
  cmd = [sys.executable, __file__, "--child", kind, "--sessions", sessions, "--array-cache", array_cache,
         "--out", args.out, "--steps", str(args.steps), *[f"--set={kv}" for kv in args.set]]
  env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  t = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise SystemExit(f"{kind} {sessions} {array_cache} failed:\n{proc.stderr[-3000:]}")
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  out["process_wall_s"] = time.perf_counter() - t
  print(f"  {kind:<8} {array_cache:<40} {json.dumps(out)}", file=sys.stderr)
  return out


def _du_mb(paths) -> float:
  total = 0
  for p in paths:
    for root, _, files in os.walk(p):
      total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total / 2**20


def _dense_mb(cache_dir: Path) -> float:
  total = 0
  for manifest in cache_dir.glob("*/base/manifest.json"):
    for name, spec in json.loads(manifest.read_text())["arrays"].items():
      if name.endswith(".spikes"):
        total += int(__import__("numpy").prod(spec["shape"]))
  return total / 2**20


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--corpus", help="a synthetic corpus directory (eids.txt)")
  p.add_argument("--sizes", default="8,64,256")
  p.add_argument("--out", required=True)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--skip-off", default="", help="sizes whose cache-off training run is skipped")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="a config override of the training runs, e.g. --set mesh.data=1 --set mesh.fsdp=2")
  p.add_argument("--data-only", action="store_true",
                 help="only the data layer (corpus + 20 batches, no model), cache (built by a full run) and off")
  p.add_argument("--child", choices=["startup", "train", "batches"], help=argparse.SUPPRESS)
  p.add_argument("--sessions", help=argparse.SUPPRESS)
  p.add_argument("--array-cache", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    from ibl_jax import cli  # pylint: disable=g-import-not-at-top
    cli.quiet_logs(0)
    result = {"startup": _child_startup, "train": _child_train, "batches": _child_batches}[args.child](args)
    result.update(peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **_status_mb())
    print(json.dumps(result))
    return
  corpus, out = Path(args.corpus), Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  eids = (corpus / "eids.txt").read_text().split()
  if args.data_only:
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
      spec = corpus / f"first{size}.txt"
      spec.write_text("".join(e + "\n" for e in eids[:size]))
      print(f"S = {size}", file=sys.stderr)
      row = {k: _run_child("batches", str(spec), v, args) for k, v in
             (("cache", str(out / f"cache{size}")), ("off", "off"))}
      rows.append({"sessions": size, "dense_mb": _dense_mb(out / f"cache{size}"), **row})  # after it is built
      (out / "data_only.json").write_text(json.dumps(rows, indent=1))
    print("| S | dense MB | peak RSS cache / off MB | RssAnon cache / off MB | RssFile cache / off MB "
          "| ms/batch cache / off |")
    print("|---|---|---|---|---|---|")
    for r in rows:
      c, o = r["cache"], r["off"]
      print(f"| {r['sessions']} | {r['dense_mb']:.0f} | {c['peak_rss_mb']:.0f} / {o['peak_rss_mb']:.0f} "
            f"| {c['RssAnon_with_corpus']:.0f} / {o['RssAnon_with_corpus']:.0f} "
            f"| {c['RssFile_with_corpus']:.0f} / {o['RssFile_with_corpus']:.0f} | {c['batch_ms']:.2f} / {o['batch_ms']:.2f} |")
    return
  results = []
  for size in (int(s) for s in args.sizes.split(",")):
    spec = corpus / f"first{size}.txt"
    spec.write_text("".join(e + "\n" for e in eids[:size]))
    cache_dir = out / f"cache{size}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"S = {size}", file=sys.stderr)
    row = {"sessions": size, "cold": _run_child("startup", str(spec), str(cache_dir), args),
           "warm": _run_child("startup", str(spec), str(cache_dir), args),
           "train_cache": _run_child("train", str(spec), str(cache_dir), args)}
    if str(size) not in args.skip_off.split(","):
      row["train_off"] = _run_child("train", str(spec), "off", args)
    row.update(arrow_mb=_du_mb([corpus / e for e in eids[:size]]), cache_mb=_du_mb([cache_dir]),
               dense_mb=_dense_mb(cache_dir))
    results.append(row)
    (out / "results.json").write_text(json.dumps(results, indent=1))
  print("| S | Arrow MB | cache MB | dense MB | cold start s (CPU) | warm start s (CPU) | peak RSS train, cache MB "
        "| peak RSS train, off MB | trials/s cache | trials/s off |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    off = r.get("train_off", {})
    print(f"| {r['sessions']} | {r['arrow_mb']:.0f} | {r['cache_mb']:.0f} | {r['dense_mb']:.0f} "
          f"| {r['cold']['wall_s']:.1f} ({r['cold']['cpu_s']:.1f}) | {r['warm']['wall_s']:.2f} ({r['warm']['cpu_s']:.2f}) "
          f"| {r['train_cache']['peak_rss_mb']:.0f} | {off.get('peak_rss_mb', float('nan')):.0f} "
          f"| {r['train_cache']['trials_per_s'] or float('nan'):.0f} | {off.get('trials_per_s') or float('nan'):.0f} |")


if __name__ == "__main__":
  main()
