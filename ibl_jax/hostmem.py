"""Host memory: a command that runs large steps on a CPU restarts with glibc's malloc reusing freed memory.

XLA:CPU allocates each step's temporaries afresh (246 MiB a device for the paper NDT1's train step at batch 16).
glibc serves a block that large with its own `mmap` and gives it back with `munmap` on free (blocks of a
thread's own arena, as XLA's threads have, go that way whatever the thresholds), so every step faulted its
temporaries' pages in again: 126k page faults and 0.26-0.33 s of kernel time in a 0.95-1.03 s step on a 2-core
host. With one arena (the main one, grown by `brk`), no `mmap` for blocks and no trimming, the second step finds
its temporaries in the heap: no page faults, 0.78-0.80 s (docs/performance.md, row 40), for 0.9 GB more peak
memory (1.85 -> 2.75 GB). It is not a rule: small models' short steps wait on the one arena's lock (NDT1 small
bf16 419 -> 285-341 trials/s), and NDT2's paper step fragmented the one heap (6.6 -> 14.3 s a step, peak 4.3 ->
13.1 GB). Hence a config switch, `mesh.reuse_freed_memory`, on for the paper NDT1 alone, where it was measured.

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

TUNABLES = (("glibc.malloc.arena_max", "1"), ("glibc.malloc.mmap_max", "0"),
            ("glibc.malloc.trim_threshold", str(2**31 - 1)))
STEP_COMMANDS = ("ibl_jax.train", "ibl_jax.finetune", "ibl_jax.evaluate", "ibl_jax.predict", "ibl_jax.bench")
STEP_SCRIPTS = ("ibl-jax-train", "ibl-jax-finetune")  # pyproject's [project.scripts]
_RESTARTED = "IBL_JAX_MALLOC_RESTARTED"  # set on the restart: never a second one


def tunables_value(current: str = "") -> str:
  """GLIBC_TUNABLES with ours added to `current` (colon-separated name=value); a value already set stays."""
  items = [t for t in current.split(":") if t]
  names = {t.split("=", 1)[0] for t in items}
  return ":".join(items + [f"{name}={value}" for name, value in TUNABLES if name not in names])


def tunables_active(env=None) -> bool:
  """Whether this process's environment names every one of our tunables (glibc read them at start)."""
  current = (os.environ if env is None else env).get("GLIBC_TUNABLES", "")
  names = {t.split("=", 1)[0] for t in current.split(":") if t}
  return all(name in names for name, _ in TUNABLES)


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


def should_restart(orig_argv: list[str], env, system: str, libc: str, accelerator: bool = False) -> bool:
  return (system == "Linux" and libc == "glibc" and not accelerator
          and env.get("IBL_JAX_KEEP_FREED_MEMORY", "1") != "0"
          and _RESTARTED not in env and not tunables_active(env) and step_command(orig_argv) is not None)


def _accelerator_plugin(env) -> bool:
  """Whether JAX may find a GPU/TPU here: a PJRT plugin or libtpu installed, and JAX_PLATFORMS not just cpu."""
  if env.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    return False
  return any(importlib.util.find_spec(m) is not None for m in ("jax_plugins", "libtpu"))


def restart_with_tunables() -> None:
  """Replaces this process by the same command with our GLIBC_TUNABLES, when it is a step command on a CPU host
  that lacks them (see the module docstring); returns without doing anything otherwise (a caller in-process,
  such as a test or a notebook, is never restarted)."""
  argv = getattr(sys, "orig_argv", None)
  if not argv or step_command(argv) is None:  # the usual case, decided without reading the interpreter's file
    return
  if not should_restart(argv, os.environ, platform.system(), platform.libc_ver()[0], _accelerator_plugin(os.environ)):
    return
  env = dict(os.environ, GLIBC_TUNABLES=tunables_value(os.environ.get("GLIBC_TUNABLES", "")), **{_RESTARTED: "1"})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, env)
