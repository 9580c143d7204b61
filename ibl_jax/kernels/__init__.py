"""CPU kernels in C++ for what XLA:CPU cannot fuse, built on first use and called through XLA's FFI.

`load(name)` compiles `<name>.cc` (next to this file) with the host's C++ compiler for this very CPU
(`-march=native`) into a cache directory, loads it, and returns the `ctypes` library; None, with one warning,
when there is no compiler or the build fails, so callers fall back to their pure-JAX path. The cache key covers the
source, the flags, the compiler, jaxlib (its FFI headers) and the CPU's instruction sets, so a cluster whose nodes
differ builds one library per kind of node. Concurrent processes may build at once: each writes its own temporary
file and renames it into place.

`IBL_JAX_CPU_KERNELS=0` turns them off, `IBL_JAX_CPU_AMX=0` keeps them off Intel's AMX tiles;
`IBL_JAX_KERNEL_CACHE` moves the cache (default `$XDG_CACHE_HOME/ibl_jax/kernels`, else
`~/.cache/ibl_jax/kernels`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jaxlib

log = logging.getLogger(__name__)

HERE = pathlib.Path(__file__).parent
# -fno-math-errno and -fno-trapping-math let the compiler vectorise the maths; no -ffast-math, whose
# finite-math assumption would break the -inf of masked logits.
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC", "-w")
X86_FLAGS = ("-mprefer-vector-width=512",)  # GCC otherwise keeps 256-bit vectors on AVX-512 CPUs


def enabled() -> bool:
  return os.environ.get("IBL_JAX_CPU_KERNELS", "1") != "0"


def amx_enabled() -> bool:
  """Kernels may use Intel's AMX tiles where the CPU has them (`IBL_JAX_CPU_AMX=0`: never)."""
  return os.environ.get("IBL_JAX_CPU_AMX", "1") != "0"


def cache_dir() -> pathlib.Path:
  if os.environ.get("IBL_JAX_KERNEL_CACHE"):
    return pathlib.Path(os.environ["IBL_JAX_KERNEL_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "ibl_jax" / "kernels"


def _cpu_features() -> str:
  """The CPU's instruction sets (what -march=native compiles for)."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        return line
  except OSError:
    pass
  return platform.processor()


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _flags() -> tuple[str, ...]:
  return FLAGS + (X86_FLAGS if platform.machine() in ("x86_64", "AMD64") else ())


def _build(source: pathlib.Path, compiler: str) -> pathlib.Path:
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
  key = hashlib.sha256("\n".join([source.read_text(), " ".join(_flags()), version, jaxlib.__version__,
                                  platform.machine(), _cpu_features()]).encode()).hexdigest()[:16]
  target = cache_dir() / f"{source.stem}-{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
  os.close(fd)
  try:
    subprocess.run([compiler, *_flags(), f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp],
                   capture_output=True, text=True, check=True)
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return target


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
  """The compiled library of `<name>.cc`, or None (kernels off, no compiler, or a failed build; logged once)."""
  if not enabled():
    return None
  compiler = _compiler()
  if compiler is None:
    log.warning("no C++ compiler found: CPU kernel %s not built, using the pure-JAX path", name)
    return None
  try:
    return ctypes.cdll.LoadLibrary(str(_build(HERE / f"{name}.cc", compiler)))
  except (OSError, subprocess.CalledProcessError) as e:
    detail = getattr(e, "stderr", "") or str(e)
    log.warning("CPU kernel %s did not build (%s): using the pure-JAX path", name, detail.strip()[-300:])
    return None
