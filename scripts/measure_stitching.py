"""Per-trial stitch gather against rows grouped by session (`jax.lax.ragged_dot`), forward + backward.

  python scripts/measure_stitching.py                     # paper size: B 64, T 100, N_max = C = 668; S 4 and 32
  python scripts/measure_stitching.py --batch 256 --sessions 4,16

`gather` is ibl_jax/models/stitching.py: every trial gathers its session's [N_max, C] kernel (B·N·C values moved)
and one batched matmul runs. `grouped` sorts the rows by session and runs one ragged matmul over the sessions'
kernels (S·N·C values read), then restores the order. Both give the same outputs (checked); each is timed as the
gradient of a squared-sum loss with respect to the kernels, interleaved, median of `--reps` calls.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def gather(kernel_SxIxO, x_BxTxI, session_idx_B):
  return jnp.einsum("bti,bio->bto", x_BxTxI, kernel_SxIxO[session_idx_B])


def grouped(kernel_SxIxO, x_BxTxI, session_idx_B):
  B, T, I = x_BxTxI.shape
  order_B = jnp.argsort(session_idx_B)
  rows_per_session = jnp.bincount(session_idx_B, length=kernel_SxIxO.shape[0]) * T
  y = jax.lax.ragged_dot(x_BxTxI[order_B].reshape(B * T, I), kernel_SxIxO, rows_per_session.astype(jnp.int32))
  return jnp.zeros_like(y.reshape(B, T, -1)).at[order_B].set(y.reshape(B, T, -1))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--bins", type=int, default=100)
  ap.add_argument("--neurons", type=int, default=668)
  ap.add_argument("--channels", type=int, default=668)
  ap.add_argument("--sessions", default="4,32", help="comma-separated session counts S")
  ap.add_argument("--reps", type=int, default=3)
  a = ap.parse_args()
  print(f"backend {jax.default_backend()}, B {a.batch}, T {a.bins}, N {a.neurons}, C {a.channels}")
  print("| S | gather ms | grouped ms | grouped / gather |\n|---|---|---|---|")
  for S in (int(s) for s in a.sessions.split(",")):
    kernel = jax.random.normal(jax.random.key(0), (S, a.neurons, a.channels)) / np.sqrt(a.neurons)
    x = jax.random.normal(jax.random.key(1), (a.batch, a.bins, a.neurons))
    session_idx = jnp.asarray(np.random.default_rng(0).integers(0, S, a.batch), jnp.int32)
    np.testing.assert_allclose(gather(kernel, x, session_idx), grouped(kernel, x, session_idx), rtol=1e-3, atol=1e-3)
    fns = {name: jax.jit(jax.grad(lambda k, x, s, f=f: (f(k, x, s) ** 2).sum()))
           for name, f in (("gather", gather), ("grouped", grouped))}
    times = {name: [] for name in fns}
    for f in fns.values():
      f(kernel, x, session_idx).block_until_ready()
    for _ in range(a.reps):
      for name, f in fns.items():
        t = time.perf_counter()
        f(kernel, x, session_idx).block_until_ready()
        times[name].append(time.perf_counter() - t)
    g, r = (1000 * float(np.median(times[n])) for n in ("gather", "grouped"))
    print(f"| {S} | {g:.1f} | {r:.1f} | {r / g:.2f}x |")


if __name__ == "__main__":
  main()
