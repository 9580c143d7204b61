"""An IBL-like synthetic corpus with known firing rates, in the session schema of docs/design.md §3.

Generative model. One "brain" (`make_brain(seed)`) is shared by every session of a corpus; sessions differ in
which regions they record, their neurons and their trials.

  Task, per trial k. A block prior p_k ∈ {0.2, 0.5, 0.8} (a 0.5 block first, then 0.2 and 0.8 alternating
  every 20–100 trials) sets the probability of a left stimulus; contrast c ∈ {0, 1/16, 1/8, 1/4, 1}. The
  choice (+1 = clockwise, the correct answer to a left stimulus; −1 = counter-clockwise) follows a logistic
  psychometric curve in signed contrast, shifted by the block and a session bias, with lapses. Movement starts
  0.1–0.5 s after stimulus onset (slower for faint stimuli), feedback 0.15–0.4 s later, reward = correct.

  Inputs u_t (the `INPUTS` channels): left/right stimulus transients from bin 25 (`STIM_BIN`), the block prior
  (constant), choice × a movement ramp, vigour × the wheel-speed profile, ±1 × a feedback transient for
  reward, and whisking: a slow AR(1) latent (τ 0.5 s) plus movement-evoked whisking.

  Latents. A linear dynamical system over `REGIONS` × 3 latents: x_{t+1} = A x_t + B u_t + σ ε_t, started
  `BURN_IN` bins before the trial window. Each region's block of A is a damped rotation plus a slow mode;
  off-diagonal blocks (`COUPLING`) let one region's state drive another's, so a region's activity carries
  information about its partners'; B routes each input to the regions that plausibly receive it
  (`INPUT_SHARES`); the private noise ε gives trial-to-trial variability that the coupling spreads. Latents are
  standardised (z) with statistics of a reference run, so neuron loadings have a fixed meaning.

  Neurons (per session). A neuron of region r reads only r's latents: rate = exp(b_n + c_n · z_r,t) spikes per
  bin, with a log-normal mean rate around 6 Hz (most 1–30 Hz) and a modulation depth of 0.4–1.0 in log units;
  counts ~ Poisson(rate), capped at 255. Depths lie in per-region bands along one probe.

  Behaviour. Wheel speed = vigour × movement profile (peak 160 ms after onset) with multiplicative and small
  additive noise, ≥ 0; whisker motion energy = softplus of the whisking channel plus observation noise. Both
  drive the latents, so they are decodable from the neurons, but only through the dynamics and Poisson noise.

Everything is a deterministic function of the seeds: the same seed gives byte-identical arrays.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ibl_jax.data import schema
from ibl_jax.errors import UserError

N_BINS = 100
STIM_BIN = 25  # stimulus onset: the window is −0.5 s … +1.5 s
BURN_IN = 100  # bins simulated before the window so each trial starts from the stationary state
INTERVAL_LEN_S = 2.0
REGIONS = ("VISa", "CA1", "DG", "LP", "PO")  # order along the probe, surface → tip
# Depth bands in µm above the probe tip (IBL's convention: depth is measured from the tip).
DEPTH_BANDS_UM = {"VISa": (2900.0, 3700.0), "CA1": (2300.0, 2800.0), "DG": (1700.0, 2200.0),
                  "LP": (900.0, 1600.0), "PO": (200.0, 800.0)}
CONTRASTS = (0.0, 0.0625, 0.125, 0.25, 1.0)
INPUTS = ("stim_left", "stim_right", "block", "choice", "vigour", "reward", "whisking")
# Variance share of each input in the latents of the regions it reaches (before the spread by coupling),
# and that of the private noise: the reference run in `make_brain` calibrates B and σ to these.
INPUT_SHARES = {
    "VISa": {"stim_left": 0.2, "stim_right": 0.2, "block": 0.03, "choice": 0.1, "whisking": 0.1},
    "CA1": {"block": 0.05, "choice": 0.1, "reward": 0.3, "whisking": 0.05},
    "DG": {"block": 0.05, "choice": 0.05, "vigour": 0.1, "reward": 0.2, "whisking": 0.05},
    "LP": {"stim_left": 0.1, "stim_right": 0.1, "choice": 0.2, "vigour": 0.1, "whisking": 0.1},
    "PO": {"stim_left": 0.03, "stim_right": 0.03, "choice": 0.05, "vigour": 0.15, "whisking": 0.3},
}
NOISE_SHARE = 0.25
COUPLING = (("VISa", "LP"), ("LP", "VISa"), ("PO", "LP"), ("LP", "PO"), ("VISa", "CA1"), ("CA1", "DG"),
            ("DG", "CA1"), ("PO", "DG"))  # (from, to)
MAX_RATE = 5.0  # spikes per bin (250 Hz): a safety cap far above typical rates


@dataclasses.dataclass(frozen=True)
class Brain:
  """The latent dynamics shared by every session of a corpus.

  Attributes:
    seed: the seed it was made from.
    regions: all regions, in probe order; region r owns latents r*d … (r+1)*d − 1.
    latents_per_region: d.
    A_DxD, B_DxM: dynamics and input matrices (M = len(INPUTS)).
    noise_std_D: σ of the private noise of each latent per bin.
    mean_D, std_D: standardisation of the raw latents (z = (x − mean) / std), from a reference run.
    cov_DxD: covariance of the standardised latents (sets each neuron's baseline so its mean rate is as drawn).
  """
  seed: int
  regions: tuple[str, ...]
  latents_per_region: int
  A_DxD: np.ndarray
  B_DxM: np.ndarray
  noise_std_D: np.ndarray
  mean_D: np.ndarray
  std_D: np.ndarray
  cov_DxD: np.ndarray

  def latent_slice(self, region: str) -> slice:
    r = self.regions.index(region)
    return slice(r * self.latents_per_region, (r + 1) * self.latents_per_region)


# ---------------------------------------------------------------------------------------------------------
# The brain.


def _region_block(rng: np.random.Generator, d: int) -> np.ndarray:
  """A damped rotation (period 0.3–1 s) plus slow modes, in a random orthonormal basis."""
  block_dxd = np.diag(rng.uniform(0.95, 0.98, d))
  theta = 2 * np.pi / rng.uniform(15, 50)
  rho = rng.uniform(0.88, 0.94)
  block_dxd[:2, :2] = rho * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  q_dxd, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return q_dxd @ block_dxd @ q_dxd.T


def _dynamics(rng: np.random.Generator, d: int, coupling: float) -> np.ndarray:
  """A: damped within-region blocks plus random coupling blocks along `COUPLING`, made stable."""
  R = len(REGIONS)
  A_DxD = np.zeros((R * d, R * d))
  for r in range(R):
    A_DxD[r * d:(r + 1) * d, r * d:(r + 1) * d] = _region_block(rng, d)
  for src, dst in COUPLING:
    s, t = REGIONS.index(src), REGIONS.index(dst)
    A_DxD[t * d:(t + 1) * d, s * d:(s + 1) * d] = coupling * rng.normal(size=(d, d)) / np.sqrt(d)
  radius = np.max(np.abs(np.linalg.eigvals(A_DxD)))
  if radius > 0.985:  # keep the system stable whatever the coupling draw
    A_DxD *= 0.985 / radius
  return A_DxD


def _lds(A_DxD: np.ndarray, drive_KxTxD: np.ndarray) -> np.ndarray:
  """x_{t+1} = A x_t + drive_t from x = 0; returns the window part `[K, N_BINS, D]` (after `BURN_IN`)."""
  K, T, D = drive_KxTxD.shape
  x_KxTxD = np.empty((K, T, D))
  x_KD = np.zeros((K, D))
  for t in range(T):
    x_KD = x_KD @ A_DxD.T + drive_KxTxD[:, t]
    x_KxTxD[:, t] = x_KD
  return x_KxTxD[:, BURN_IN:]


def _calibrate(rng: np.random.Generator, A_DxD: np.ndarray, d: int, u_KxTxM: np.ndarray):
  """B and σ such that each input / the noise alone explains its share of its region's latent variance.

  The system is linear, so one run per (region, input) with a unit-norm input direction gives the scale.
  """
  D, M = A_DxD.shape[0], len(INPUTS)
  B_DxM, noise_std_D = np.zeros((D, M)), np.zeros(D)
  for r, region in enumerate(REGIONS):
    own = slice(r * d, (r + 1) * d)
    for name, share in INPUT_SHARES[region].items():
      m = INPUTS.index(name)
      direction_d = rng.normal(size=d)
      B_DxM[own, m] = direction_d / np.linalg.norm(direction_d)
      drive_KxTxD = u_KxTxM[..., m:m + 1] * B_DxM[:, m]
      drive_KxTxD[..., :own.start] = drive_KxTxD[..., own.stop:] = 0  # this region's entry alone
      var = _lds(A_DxD, drive_KxTxD)[..., own].var(axis=(0, 1)).sum()
      B_DxM[own, m] *= np.sqrt(share / var)
    noise_KxTxD = np.zeros(u_KxTxM.shape[:2] + (D,))
    noise_KxTxD[..., own] = rng.normal(size=u_KxTxM.shape[:2] + (d,))
    noise_std_D[own] = np.sqrt(NOISE_SHARE * d / _lds(A_DxD, noise_KxTxD)[..., own].var(axis=(0, 1)).sum())
  return B_DxM, noise_std_D


def make_brain(seed: int, *, latents_per_region: int = 3, coupling: float = 0.15) -> Brain:
  """The shared latent dynamics ("one brain") for `seed`; see the module docstring (latents_per_region >= 2)."""
  rng = np.random.default_rng([seed, 0xB7A1])
  d = latents_per_region
  A_DxD = _dynamics(rng, d, coupling)
  D = A_DxD.shape[0]
  ref_rng = np.random.default_rng([seed, 0x5EF])  # a reference run of typical trials
  u_KxTxM, _ = _inputs(ref_rng, _simulate_task(ref_rng, 256))
  B_DxM, noise_std_D = _calibrate(rng, A_DxD, d, u_KxTxM)
  raw = Brain(seed, REGIONS, d, A_DxD, B_DxM, noise_std_D, np.zeros(D), np.ones(D), np.eye(D))
  # Standardise, so that neuron loadings mean the same in every session.
  flat_ND = _run_latents(raw, u_KxTxM, ref_rng).reshape(-1, D)
  mean_D, std_D = flat_ND.mean(0), flat_ND.std(0)
  cov_DxD = np.cov(((flat_ND - mean_D) / std_D).T)
  return dataclasses.replace(raw, mean_D=mean_D, std_D=std_D, cov_DxD=cov_DxD)


# ---------------------------------------------------------------------------------------------------------
# Task and inputs.


def _block_priors(rng: np.random.Generator, n_trials: int) -> np.ndarray:
  """A 0.5 block, then 0.2/0.8 alternating; lengths 20 + Exp(40), capped at 100 (IBL-like)."""
  blocks, prior = [], 0.5
  biased = rng.choice([0.2, 0.8])
  while len(blocks) < n_trials:
    blocks += [prior] * int(min(20 + rng.exponential(40.0), 100))
    prior, biased = biased, {0.2: 0.8, 0.8: 0.2}[biased]
  return np.asarray(blocks[:n_trials])


def _simulate_task(rng: np.random.Generator, n_trials: int) -> dict[str, np.ndarray]:
  """Per-trial task variables: block, stimulus, choice, timing, reward, vigour."""
  session_bias = rng.normal(0.0, 0.3)  # this animal's side preference
  block = _block_priors(rng, n_trials)
  left = rng.random(n_trials) < block
  contrast = rng.choice(CONTRASTS, n_trials)
  signed = np.where(left, contrast, -contrast)
  lapse = 0.05
  logit = 12.0 * signed + 4.0 * (block - 0.5) + session_bias
  p_cw = lapse + (1 - 2 * lapse) / (1 + np.exp(-logit))
  choice = np.where(rng.random(n_trials) < p_cw, 1.0, -1.0)
  reaction_s = 0.1 + 0.4 * rng.beta(2.0, 2.0 + 4.0 * contrast)  # faint stimuli: slower
  onset = STIM_BIN + np.round(reaction_s / schema.BINSIZE_S).astype(np.int64)
  feedback = onset + np.round(rng.uniform(0.15, 0.4, n_trials) / schema.BINSIZE_S).astype(np.int64)
  return {
      "block": block, "contrast_left": np.where(left, contrast, 0.0),
      "contrast_right": np.where(left, 0.0, contrast), "choice": choice,
      "reward": (choice == np.where(left, 1.0, -1.0)).astype(np.float64), "reaction_time": reaction_s,
      "movement_onset_bin": onset, "feedback_bin": feedback,
      "vigour": np.exp(rng.normal(np.log(3.0), 0.3, n_trials)),  # peak wheel speed, rad/s
  }


def _alpha(s: np.ndarray, tau: float) -> np.ndarray:
  """Alpha-function transient peaking at 1 when s = tau (bins), zero before s = 0."""
  s = np.maximum(s, 0.0)
  return (s / tau) * np.exp(1.0 - s / tau)


def _transient(s: np.ndarray, tau: float, tail: float, tau_tail: float) -> np.ndarray:
  """An alpha transient plus a decaying tail of relative height `tail`, zero before s = 0."""
  return _alpha(s, tau) + tail * np.exp(-np.maximum(s, 0.0) / tau_tail) * (s >= 0)


def _wheel_profile(s: np.ndarray) -> np.ndarray:
  """Wheel-speed shape after movement onset (s bins): a gamma bump peaking at 8 bins (160 ms)."""
  s = np.maximum(s, 0.0)
  return (s / 8.0) ** 2 * np.exp(2.0 * (1.0 - s / 8.0))


def _inputs(rng: np.random.Generator, task: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """The input channels `[K, BURN_IN + N_BINS, M]` and the whisking latent `[K, BURN_IN + N_BINS]`."""
  K, T = len(task["block"]), BURN_IN + N_BINS
  bin_T = np.arange(T) - BURN_IN  # window bin index; negative in the burn-in
  since_stim_KxT = np.broadcast_to(bin_T - STIM_BIN - 2.0, (K, T))  # 40 ms visual latency
  since_move_KxT = bin_T[None] - task["movement_onset_bin"][:, None]
  since_fb_KxT = bin_T[None] - task["feedback_bin"][:, None]
  stim_KxT = _transient(since_stim_KxT, 3.0, 0.3, 25.0)
  crf = lambda c: (c / (c + 0.08)) * 1.08  # saturating contrast response, crf(1) = 1
  # Choice: a preparatory ramp over the 6 bins before onset, then a slow decay.
  ramp_KxT = np.where(since_move_KxT < 0, np.clip((since_move_KxT + 6) / 6, 0, 1), np.exp(-since_move_KxT / 15))
  wheel_KxT = _wheel_profile(since_move_KxT)
  feedback_KxT = _transient(since_fb_KxT, 5.0, 0.3, 30.0)
  whisking_KxT = _ar1(rng, K, T, tau=25.0) + 0.8 * wheel_KxT
  u_KxTxM = np.stack([
      crf(task["contrast_left"])[:, None] * stim_KxT,
      crf(task["contrast_right"])[:, None] * stim_KxT,
      np.broadcast_to(((task["block"] - 0.5) / 0.3)[:, None], (K, T)),
      task["choice"][:, None] * ramp_KxT,
      (task["vigour"] / 3.0)[:, None] * wheel_KxT,
      (2 * task["reward"] - 1)[:, None] * feedback_KxT,
      whisking_KxT,
  ], axis=-1)
  return u_KxTxM, whisking_KxT


def _ar1(rng: np.random.Generator, K: int, T: int, tau: float) -> np.ndarray:
  """Stationary unit-variance AR(1) traces `[K, T]` with time constant `tau` bins."""
  phi = np.exp(-1.0 / tau)
  eps_KxT = rng.normal(size=(K, T))
  out_KxT = np.empty((K, T))
  out_KxT[:, 0] = eps_KxT[:, 0]
  for t in range(1, T):
    out_KxT[:, t] = phi * out_KxT[:, t - 1] + np.sqrt(1 - phi**2) * eps_KxT[:, t]
  return out_KxT


def _run_latents(brain: Brain, u_KxTxM: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Runs the LDS over burn-in + window; returns the standardised window latents `[K, N_BINS, D]`."""
  noise_KxTxD = brain.noise_std_D * rng.normal(size=u_KxTxM.shape[:2] + brain.noise_std_D.shape)
  x_KxTxD = _lds(brain.A_DxD, np.tensordot(u_KxTxM, brain.B_DxM.T, axes=1) + noise_KxTxD)
  return (x_KxTxD - brain.mean_D) / brain.std_D


# ---------------------------------------------------------------------------------------------------------
# Sessions.


def _uuids(rng: np.random.Generator, n: int) -> list[str]:
  return [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(n)]


def _neurons(rng: np.random.Generator, brain: Brain, regions: Sequence[str], n_neurons: int):
  """Regions, depths, loadings `[D, N]` and baselines `[N]` of a session's neurons, sorted by depth."""
  R = len(regions)
  floor = min(5, n_neurons // R)  # every recorded region gets a few neurons
  counts_R = floor + rng.multinomial(n_neurons - floor * R, rng.dirichlet(np.full(R, 2.0)))
  region_N = np.repeat(np.asarray(regions), counts_R)
  depth_N = np.concatenate([rng.uniform(*DEPTH_BANDS_UM[r], n) for r, n in zip(regions, counts_R)])
  order = np.argsort(depth_N, kind="stable")
  region_N, depth_N = region_N[order], np.round(depth_N[order], 1)
  d, D = brain.latents_per_region, brain.A_DxD.shape[0]
  loadings_DxN = np.zeros((D, n_neurons))
  gain_N = rng.uniform(0.4, 1.0, n_neurons)  # modulation depth, log units
  directions_dxN = rng.normal(size=(d, n_neurons))
  directions_dxN /= np.linalg.norm(directions_dxN, axis=0)
  for n, region in enumerate(region_N):
    loadings_DxN[brain.latent_slice(region), n] = gain_N[n] * directions_dxN[:, n]
  mean_hz_N = np.clip(np.exp(rng.normal(np.log(6.0), 0.8, n_neurons)), 0.5, 60.0)
  # exp(b + c·z) with z ~ N(0, cov) has mean exp(b + c'Σc/2): subtract it so the mean rate is as drawn.
  var_N = np.einsum("dn,de,en->n", loadings_DxN, brain.cov_DxD, loadings_DxN)
  bias_N = np.log(mean_hz_N * schema.BINSIZE_S) - var_N / 2
  return region_N, depth_N, loadings_DxN, bias_N


def _behaviour(rng: np.random.Generator, task: dict[str, np.ndarray], whisking_KxT: np.ndarray):
  """Observed wheel speed and whisker motion energy `[K, N_BINS]` (float32, ≥ 0)."""
  K = len(task["choice"])
  since_move_KxT = np.arange(N_BINS)[None] - task["movement_onset_bin"][:, None]
  jitter_KxT = np.exp(0.15 * rng.normal(size=(K, N_BINS)))
  wheel_KxT = (task["vigour"][:, None] * _wheel_profile(since_move_KxT) * jitter_KxT
               + 0.03 * np.abs(rng.normal(size=(K, N_BINS))))
  whisker_KxT = np.logaddexp(0.0, 0.5 + 0.8 * whisking_KxT[:, BURN_IN:]) + 0.1 * rng.normal(size=(K, N_BINS))
  return wheel_KxT.astype(np.float32), np.maximum(whisker_KxT, 0.0).astype(np.float32)


def _splits(rng: np.random.Generator, n_trials: int) -> dict[str, np.ndarray]:
  """A seeded 70/10/20 permutation of trials; each split in trial order."""
  perm = rng.permutation(n_trials)
  n_train, n_val = int(round(0.7 * n_trials)), int(round(0.1 * n_trials))
  parts = (perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:])
  return {name: np.sort(p) for name, p in zip(schema.SPLITS, parts)}


def simulate_session(brain: Brain, *, eid: str, n_neurons: int, regions: Sequence[str], n_trials: int,
                     seed: int) -> dict:
  """Simulates one session of `n_trials` trials recording `n_neurons` neurons in `regions`.

  Returns:
    A dict of numpy arrays and metadata: `counts_KxTxN` uint8, `true_rates_KxTxN` float32 (spikes per bin),
    `latents_KxTxD` float32 (standardised, all regions), `regions`/`depths`/`uuids` [N], per-trial `choice`,
    `block`, `reward`, `contrast_left`, `contrast_right`, `reaction_time`, `movement_onset_bin`,
    `feedback_bin` [K], `wheel_speed_KxT` and `whisker_KxT` float32, `splits` {name: sorted trial indices},
    and `eid`, `subject`, `lab`, `probe_name`.
  """
  unknown = sorted(set(regions) - set(brain.regions))
  if unknown or len(set(regions)) != len(regions) or not regions:
    raise UserError(f"session {eid}: regions must be distinct, non-empty, from {brain.regions}; got {regions}")
  if n_neurons < len(regions) or n_trials < 1:
    raise UserError(f"session {eid}: need n_neurons >= {len(regions)} regions and n_trials >= 1, "
                     f"got {n_neurons}, {n_trials}")
  rng = np.random.default_rng(seed)
  regions = [r for r in brain.regions if r in regions]  # probe order
  task = _simulate_task(rng, n_trials)
  u_KxTxM, whisking_KxT = _inputs(rng, task)
  z_KxTxD = _run_latents(brain, u_KxTxM, rng)
  region_N, depth_N, loadings_DxN, bias_N = _neurons(rng, brain, regions, n_neurons)
  z_KxTxD = z_KxTxD.astype(np.float32)  # float32 from here: rates are stored as float32 anyway
  # tensordot is one 2-D product; a batched 3-D matmul is far slower with threaded BLAS.
  log_rates_KxTxN = np.tensordot(z_KxTxD, loadings_DxN.astype(np.float32), axes=1) + bias_N.astype(np.float32)
  rates_KxTxN = np.minimum(np.exp(log_rates_KxTxN), np.float32(MAX_RATE))
  counts_KxTxN = np.minimum(rng.poisson(rates_KxTxN), 255).astype(np.uint8)
  wheel_KxT, whisker_KxT = _behaviour(rng, task, whisking_KxT)
  session = {
      "eid": eid, "subject": f"SYN-{eid[:4]}", "lab": "synthetic", "probe_name": "probe00",
      "counts_KxTxN": counts_KxTxN, "true_rates_KxTxN": rates_KxTxN, "latents_KxTxD": z_KxTxD,
      "regions": region_N, "depths": depth_N, "uuids": np.asarray(_uuids(rng, n_neurons)),
      "wheel_speed_KxT": wheel_KxT, "whisker_KxT": whisker_KxT, "splits": _splits(rng, n_trials),
  }
  session.update({k: v for k, v in task.items() if k != "vigour"})
  return session


# ---------------------------------------------------------------------------------------------------------
# Writing sessions in the schema of docs/design.md §3.


def features(true_rates: bool = True):
  """Explicit `datasets.Features` of a synthetic session (the real schema plus `true_rates` and task extras)."""
  from datasets import Features, List, Value  # pylint: disable=g-import-not-at-top
  ints, floats, f32 = List(Value("int64")), Value("float64"), List(Value("float32"))
  feats = Features({
      schema.SPIKES_DATA: ints, schema.SPIKES_INDICES: ints, schema.SPIKES_INDPTR: ints, schema.SPIKES_SHAPE: ints,
      schema.REGIONS: List(Value("string")), schema.DEPTHS: List(Value("float64")),
      schema.UUIDS: List(Value("string")),
      schema.EID: Value("string"), "subject": Value("string"), "lab": Value("string"),
      "probe_name": Value("string"), "binsize": floats, "interval_len": floats,
      "choice": floats, "block": floats, "reward": floats, "wheel-speed": f32, "whisker-motion-energy": f32,
      schema.TRUE_RATES: List(f32),
      "contrast_left": floats, "contrast_right": floats, "reaction_time": floats,
      "movement_onset_bin": Value("int64"), "feedback_bin": Value("int64"), "trial_index": Value("int64"),
  })
  if not true_rates:
    del feats[schema.TRUE_RATES]
  return feats


def to_dataset_dict(session: dict, *, true_rates: bool = True):
  """The session as a `datasets.DatasetDict` (splits train/val/test, one row per trial); `true_rates=False`
  leaves out the float32 rates column (4x the counts' dense size), for large corpora."""
  from datasets import Dataset, DatasetDict  # pylint: disable=g-import-not-at-top
  counts_KxTxN = session["counts_KxTxN"]
  _, T, N = counts_KxTxN.shape
  csr = [schema.dense_to_csr(c_TxN) for c_TxN in counts_KxTxN]
  feats = features(true_rates)
  out = {}
  for name, idx in session["splits"].items():
    n = len(idx)
    repeat = lambda value: [value] * n
    columns = {
        schema.SPIKES_DATA: [csr[k][0] for k in idx], schema.SPIKES_INDICES: [csr[k][1] for k in idx],
        schema.SPIKES_INDPTR: [csr[k][2] for k in idx], schema.SPIKES_SHAPE: repeat([T, N]),
        schema.REGIONS: repeat(session["regions"].tolist()), schema.DEPTHS: repeat(session["depths"].tolist()),
        schema.UUIDS: repeat(session["uuids"].tolist()),
        schema.EID: repeat(session["eid"]), "subject": repeat(session["subject"]), "lab": repeat(session["lab"]),
        "probe_name": repeat(session["probe_name"]), "binsize": repeat(schema.BINSIZE_S),
        "interval_len": repeat(INTERVAL_LEN_S),
        "wheel-speed": session["wheel_speed_KxT"][idx], "whisker-motion-energy": session["whisker_KxT"][idx],
        "trial_index": idx,
    }
    if true_rates:
      columns[schema.TRUE_RATES] = session["true_rates_KxTxN"][idx]
    for key in ("choice", "block", "reward", "contrast_left", "contrast_right", "reaction_time",
                "movement_onset_bin", "feedback_bin"):
      columns[key] = session[key][idx]
    out[name] = Dataset.from_dict({key: columns[key] for key in feats}, features=feats)
  return DatasetDict(out)


def _session_plan(seed: int, index: int, *, min_neurons: int, max_neurons: int, min_trials: int,
                  max_trials: int) -> dict:
  """The `simulate_session` arguments of session `index` of the corpus `seed`."""
  rng = np.random.default_rng([seed, 0x5E55, index])
  n_regions = int(rng.integers(3, len(REGIONS) + 1))
  regions = [REGIONS[i] for i in np.sort(rng.choice(len(REGIONS), n_regions, replace=False))]
  return {
      "eid": _uuids(rng, 1)[0], "n_neurons": int(rng.integers(min_neurons, max_neurons + 1)), "regions": regions,
      "n_trials": int(rng.integers(min_trials, max_trials + 1)), "seed": int(rng.integers(2**62)),
  }


def write_corpus(out_dir, *, n_sessions: int = 6, n_test_sessions: int = 1, seed: int = 0, min_neurons: int = 40,
                 max_neurons: int = 160, min_trials: int = 200, max_trials: int = 300,
                 true_rates: bool = True, workers: int = 1, brain_seed: int | None = None,
                 progress: bool = True) -> list[str]:
  """Writes `n_sessions` sessions to `out_dir/<eid>/` (`DatasetDict.save_to_disk`) and returns their eids.

  Also writes `corpus.json` (the parameters and each session's `simulate_session` arguments), then
  `train_eids.txt` (pretraining sessions), `test_eids.txt` (the last `n_test_sessions`, held out from
  pretraining) and, last, `eids.txt` (all) — one eid per line, resolved relative to the file's directory.
  `true_rates=False` leaves out the true-rates column; `workers > 1` simulates and writes sessions in that many
  processes (same bytes: every session is a function of its own seed).
  `brain_seed` (default `seed`) picks the latent dynamics: another `seed` with the same `brain_seed` makes new
  sessions of the same brain (e.g. small sessions for a model pretrained on the default corpus).
  """
  import datasets  # pylint: disable=g-import-not-at-top
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  if not 0 <= n_test_sessions < n_sessions:
    raise UserError(f"need 0 <= n_test_sessions < n_sessions, got {n_test_sessions} and {n_sessions}")
  if not (1 <= min_neurons <= max_neurons and 1 <= min_trials <= max_trials):
    raise UserError(f"bad ranges: neurons {min_neurons}..{max_neurons}, trials {min_trials}..{max_trials}")
  params = dict(n_sessions=n_sessions, n_test_sessions=n_test_sessions, seed=seed, min_neurons=min_neurons,
                max_neurons=max_neurons, min_trials=min_trials, max_trials=max_trials)
  if not true_rates:  # recorded only when off, so corpus.json of a default corpus is unchanged
    params["true_rates"] = False
  if brain_seed is not None:  # likewise
    params["brain_seed"] = brain_seed
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  brain = make_brain(seed if brain_seed is None else brain_seed)
  plans = [_session_plan(seed, i, min_neurons=min_neurons, max_neurons=max_neurons, min_trials=min_trials,
                         max_trials=max_trials) for i in range(n_sessions)]
  quiet = datasets.is_progress_bar_enabled()
  if quiet:  # one bar over sessions, not three per session from `save_to_disk`
    datasets.disable_progress_bars()
  try:
    write = [(brain, plan, str(out_dir / plan["eid"]), true_rates) for plan in plans]
    if workers > 1:
      import concurrent.futures  # pylint: disable=g-import-not-at-top
      import multiprocessing  # pylint: disable=g-import-not-at-top
      with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for _ in tqdm(pool.map(_write_session, write), total=len(write), desc="synthetic sessions",
                      disable=not progress):
          pass
    else:
      for args in tqdm(write, desc="synthetic sessions", disable=not progress):
        _write_session(args)
  finally:
    if quiet:
      datasets.enable_progress_bars()
  eids = [p["eid"] for p in plans]
  n_train = n_sessions - n_test_sessions
  meta = {"generator": "ibl_jax.data.synthetic", "params": params, "n_bins": N_BINS, "stim_bin": STIM_BIN,
          "binsize": schema.BINSIZE_S, "regions": list(REGIONS), "latents_per_region": brain.latents_per_region,
          "sessions": [dict(p, test=i >= n_train) for i, p in enumerate(plans)]}
  (out_dir / "corpus.json").write_text(json.dumps(meta, indent=1) + "\n")
  (out_dir / "train_eids.txt").write_text("".join(e + "\n" for e in eids[:n_train]))
  (out_dir / "test_eids.txt").write_text("".join(e + "\n" for e in eids[n_train:]))
  (out_dir / "eids.txt").write_text("".join(e + "\n" for e in eids))  # last: its presence marks a whole corpus
  return eids


def _write_session(args) -> None:
  """One session simulated and saved (a top-level function, so worker processes can run it)."""
  import datasets  # pylint: disable=g-import-not-at-top
  datasets.disable_progress_bars()
  brain, plan, path, true_rates = args
  to_dataset_dict(simulate_session(brain, **plan), true_rates=true_rates).save_to_disk(path)


def ensure_corpus(out_dir, **kwargs) -> Path:
  """Returns `out_dir`, generating the corpus there first (`write_corpus(**kwargs)`) if `eids.txt` is absent.

  The corpus is written to a temporary sibling directory and renamed into place, so an interrupted run never
  leaves a half corpus and concurrent callers agree on one. An existing corpus made with different explicit
  `kwargs` is an error rather than silently reused.
  """
  out_dir = Path(out_dir)
  if not (out_dir / "eids.txt").exists():
    if out_dir.exists() and any(out_dir.iterdir()):
      raise FileExistsError(f"{out_dir} exists without eids.txt (an incomplete or foreign directory); "
                            "remove it to regenerate the synthetic corpus")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
      write_corpus(tmp, **kwargs)
      if out_dir.exists():
        out_dir.rmdir()  # empty (checked above); fails if another process has just filled it
      os.rename(tmp, out_dir)
    except OSError:
      if not (out_dir / "eids.txt").exists():  # not a lost race with a concurrent writer
        raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  _check_params(out_dir, kwargs)
  return out_dir


def _check_params(out_dir: Path, kwargs: dict) -> None:
  meta_path = out_dir / "corpus.json"
  if not kwargs or not meta_path.exists():
    return
  params = json.loads(meta_path.read_text()).get("params", {})
  differ = {k: (params.get(k), v) for k, v in kwargs.items() if k != "progress" and params.get(k) != v}
  if differ:
    raise UserError(f"{out_dir} holds a synthetic corpus made with other parameters (existing, requested): "
                     f"{differ}; remove it or point elsewhere")
