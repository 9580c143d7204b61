"""Host memory: a command that runs large steps on a CPU restarts with glibc's malloc reusing freed memory.

XLA:CPU allocates each step's temporaries afresh (246 MiB a device for the paper NDT1's train step at batch 16).
glibc serves a block that large with its own `mmap` and gives it back with `munmap` on free (blocks of a
thread's own arena, as XLA's threads have, go that way whatever the thresholds), so every step faulted its
temporaries' pages in again: 126k page faults and 0.26-0.33 s of kernel time in a 0.95-1.03 s step on a 2-core
host. With one arena (the main one, grown by `brk`), no `mmap` for blocks and no trimming, the second step finds
its temporaries in the heap: no page faults, 0.78-0.80 s (docs/performance.md, row 40), for 0.9 GB more peak
memory (1.85 -> 2.75 GB). It is not a rule: small models' short steps wait on the one arena's lock (NDT1 small
bf16 419 -> 285-341 trials/s), and NDT2's paper step fragmented the one heap (6.6 -> 14.3 s a step, peak 4.3 ->
13.1 GB). Hence a config switch, `mesh.reuse_freed_memory`, "one_arena" for the paper NDT1 alone, where it was
measured.

A second mode, "thread_arenas", keeps every thread's arena and its heaps instead: blocks below 256 MiB come from
the arenas (`mmap_threshold`), nothing is trimmed, and a heap emptied by a free is kept (`top_pad` of a whole
64 MiB heap: glibc deletes an empty heap only when the pad is smaller). For steps whose temporaries are 32-64
MiB a device (glibc's dynamic threshold stops at 32 MiB, a thread heap at 64): NDT2 small's training on the
synthetic corpus mapped and faulted in two 40 MiB blocks a step, 8.4 M page faults and 13 s of kernel time in
400 steps of 30 s; with it 0.3 M, 1.4 s and 24 s, for 0.2 GB more peak memory (docs/performance.md, row 53). No
lock to wait on, but temporaries above 64 MiB (the paper models') are still mapped each step: there the one
arena is the remedy.

glibc reads these settings (`GLIBC_TUNABLES`) once, at start; `mallopt` later does not reach arenas that threads
already hold (tried: the steps still faulted). So `python -m ibl_jax.train` (or another of `STEP_COMMANDS`, or
an `ibl-jax-*` script) with the switch on restarts itself once, with the settings added to its environment,
right after reading its config and before any JAX work (`parallel.set_cpu_devices`); children inherit them. Not
on a host with an accelerator plugin installed (its steps' temporaries live on the device). The price: the
process keeps its peak heap until it exits (its steps reach that peak again anyway).
`IBL_JAX_KEEP_FREED_MEMORY=0` turns this off. In a notebook or your own script, export GLIBC_TUNABLES as
`tunables_value()` gives it before starting Python.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys

from ibl_jax.errors import UserError

TUNABLES = {
    "one_arena": (("glibc.malloc.arena_max", "1"), ("glibc.malloc.mmap_max", "0"),
                  ("glibc.malloc.trim_threshold", str(2**31 - 1))),
    "thread_arenas": (("glibc.malloc.mmap_threshold", str(2**28)), ("glibc.malloc.trim_threshold", str(2**31 - 1)),
                      ("glibc.malloc.top_pad", str(2**26))),
}
_OFF, _ON = ("false", "off", "no", "0", "none", ""), ("true", "on", "yes", "1")
STEP_COMMANDS = ("ibl_jax.train", "ibl_jax.finetune", "ibl_jax.evaluate", "ibl_jax.predict", "ibl_jax.bench")
STEP_SCRIPTS = ("ibl-jax-train", "ibl-jax-finetune")  # pyproject's [project.scripts]
_RESTARTED = "IBL_JAX_MALLOC_RESTARTED"  # set on the restart: never a second one


def mode_of(setting) -> str | None:
  """`mesh.reuse_freed_memory` as a mode of TUNABLES, or None (off). True (configs saved before the modes) is
  "one_arena"."""
  if isinstance(setting, bool) or setting is None:
    return "one_arena" if setting else None
  value = str(setting).strip().lower()
  if value in _OFF:
    return None
  if value in _ON:
    return "one_arena"
  if value in TUNABLES:
    return value
  raise UserError(f"mesh.reuse_freed_memory={setting!r}: use one of {', '.join(TUNABLES)} or false")


def tunables_value(current: str = "", mode: str = "one_arena") -> str:
  """GLIBC_TUNABLES with the mode's added to `current` (colon-separated name=value); a value already set stays."""
  items = [t for t in current.split(":") if t]
  names = {t.split("=", 1)[0] for t in items}
  return ":".join(items + [f"{name}={value}" for name, value in TUNABLES[mode] if name not in names])


def active_mode(env=None) -> str | None:
  """The mode whose tunables this process's environment names, every one (glibc read them at start), or None."""
  current = (os.environ if env is None else env).get("GLIBC_TUNABLES", "")
  names = {t.split("=", 1)[0] for t in current.split(":") if t}
  return next((mode for mode, tunables in TUNABLES.items() if all(name in names for name, _ in tunables)), None)


def step_command(orig_argv: list[str]) -> str | None:
  """The step command this interpreter was started for (`python [opts] -m ibl_jax.train ...` or an ibl-jax-*
  script), else None."""
  args = iter(orig_argv[1:])
  for arg in args:
    if arg in ("-X", "-W"):  # options whose value is the next argument
      next(args, None)
    elif arg.startswith("-m"):  # -m module or -mmodule: what follows is the module's own arguments
      module = arg[2:] or next(args, "")
      return module if module in STEP_COMMANDS else None
    elif arg.startswith("-c") or arg == "-":  # code or stdin, not a command
      return None
    elif not arg.startswith("-"):  # a script: the interpreter's options have ended
      return arg if os.path.basename(arg) in STEP_SCRIPTS else None
  return None


def should_restart(orig_argv: list[str], env, system: str, libc: str, accelerator: bool = False,
                   mode: str = "one_arena") -> bool:
  return (system == "Linux" and libc == "glibc" and not accelerator
          and env.get("IBL_JAX_KEEP_FREED_MEMORY", "1") != "0"
          and _RESTARTED not in env and active_mode(env) != mode and step_command(orig_argv) is not None)


def _accelerator_plugin(env) -> bool:
  """Whether JAX may find a GPU/TPU here: a PJRT plugin or libtpu installed, and JAX_PLATFORMS not just cpu."""
  if env.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    return False
  return any(importlib.util.find_spec(m) is not None for m in ("jax_plugins", "libtpu"))


def restart_with_tunables(mode: str = "one_arena") -> None:
  """Replaces this process by the same command with the mode's GLIBC_TUNABLES, when it is a step command on a
  CPU host that lacks them (see the module docstring); returns without doing anything otherwise (a caller
  in-process, such as a test or a notebook, is never restarted)."""
  argv = getattr(sys, "orig_argv", None)
  if not argv or step_command(argv) is None:  # the usual case, decided without reading the interpreter's file
    return
  if not should_restart(argv, os.environ, platform.system(), platform.libc_ver()[0], _accelerator_plugin(os.environ),
                        mode):
    return
  env = dict(os.environ, GLIBC_TUNABLES=tunables_value(os.environ.get("GLIBC_TUNABLES", ""), mode),
             **{_RESTARTED: "1"})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, env)
