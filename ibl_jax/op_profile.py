"""Which compiled ops a step spends its time in: a `jax.profiler` trace, summed per op.

`bench --profile=DIR` traces its timed train steps into DIR (open it in TensorBoard's profile plugin or
Perfetto) and prints the ops that took the most time a step. On a CPU, XLA reports its ops to the profiler only
with `--xla_cpu_enable_xprof_traceme=true` (`XLA_FLAG`, which the bench sets before JAX starts) and a host
tracer level of 3. With several CPU devices sharing the cores, an op's wall time is stretched by the others
running beside it, and a product that waits for the shared thread pool counts the wait as its own (an Eigen
product listed at 3.6 ms took 0.24 ms alone, docs/performance.md): confirm a suspect by changing it and timing
the step.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

import jax

XLA_FLAG = "--xla_cpu_enable_xprof_traceme=true"

# Profiler events that are not compiled ops: the runtime's own spans, compilation, Python frames ("$...").
_NOT_OPS = ("$", "Thunk", "Wait", "Rendezvous", "PjitFunction", "CommonPjRtLoadedExecutable", "TaskDispatcher",
            "PjRt", "backend_compile", "shard_args", "cpp_pjit", "Execute", "jit_", "spmd", "shardy", "algsimp",
            "lower", "Compile", "Codegen")


@contextlib.contextmanager
def trace(log_dir: str | Path) -> Iterator[None]:
  """A `jax.profiler` trace into log_dir, with the host ops XLA:CPU reports (level 3) and a Perfetto file."""
  options = jax.profiler.ProfileOptions()
  options.host_tracer_level = 3
  options.python_tracer_level = 0
  with jax.profiler.trace(str(log_dir), create_perfetto_trace=True, profiler_options=options):
    yield


def trace_events(log_dir: str | Path) -> list[dict]:
  """The complete ("X") events of the newest Perfetto trace under log_dir."""
  files = sorted(Path(log_dir).glob("**/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if not files:
    return []
  with gzip.open(files[-1], "rt") as f:
    return [e for e in json.load(f).get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]


def top_ops(events: Iterable[dict], steps: int, k: int = 15) -> list[dict]:
  """The k ops with the most time, in ms a step (summed over devices) and calls a step, most first."""
  total_us, calls = collections.Counter(), collections.Counter()
  for e in events:
    name = e["name"]
    if not name.startswith(_NOT_OPS):
      total_us[name] += float(e["dur"])
      calls[name] += 1
  return [{"op": name, "ms_per_step": us / 1e3 / steps, "calls_per_step": calls[name] / steps}
          for name, us in total_us.most_common(k)]


def describe(ops: list[dict], hlo_text: str) -> list[dict]:
  """Each op with its result shape and the JAX operation it came from, read off the compiled module's text."""
  out = []
  for o in ops:
    m = re.search(rf"^\s*(?:ROOT )?%{re.escape(o['op'])} = (\S+) .*$", hlo_text, re.MULTILINE)
    source = re.search(r'op_name="([^"]*)"', m.group(0)) if m else None
    out.append({**o, "shape": m.group(1) if m else "", "source": source.group(1) if source else ""})
  return out


def format_top_ops(ops: list[dict]) -> str:
  lines = [f"  {'ms/step':>9}  {'calls':>5}  op"]
  for o in ops:
    detail = "  ".join(x for x in (o.get("shape", ""), o.get("source", "")[-90:]) if x)
    lines.append(f"  {o['ms_per_step']:9.2f}  {o['calls_per_step']:5.1f}  {o['op']}  {detail}".rstrip())
  return "\n".join(lines)
