"""Masking schemes for masked-modelling pretraining (docs/design.md §6): pure, jit-able functions of a key and a batch.

A scheme decides which entries of each trial's counts `[T, N]` the model must predict (the targets) and hides
them from its input. The scheme is a *traced* int32 dispatched with `lax.switch`, so one compiled train step
serves every scheme of multi-task masking (MtM); the prompt token tells the model which one it is solving.

  id  scheme         hidden input                                        targets               prompt  causal
  0   neuron         each neuron (all bins) w.p. `ratio`                 the hidden entries    0       no
  1   causal         each bin (all neurons) w.p. `causal_ratio`          the hidden entries    1       yes
  2   inter-region   every neuron of one region R of the trial           the hidden entries    2       no
  3   intra-region   every neuron outside R; inside R each w.p. `ratio`  hidden neurons of R   3       no
  4   temporal       each bin (all neurons) w.p. `ratio`                 the hidden entries    0       no
  5   random         each entry w.p. `ratio`                             the hidden entries    0       no
  6   random_token   each token (a `token_shape` patch) w.p. `ratio`     the hidden entries    0       no

A token is `token_shape = (bins, neurons)` entries (masking.token_bins / token_neurons; neurons 0 = all of them):
NDT1's token is one bin of every neuron, NDT2's a space-time patch, so random_token hides what the model embeds
as one token. Masking always acts on neurons × bins, before any patching.

Temporal, random and random_token have no prompt token of their own: the paper's prompt vocabulary holds the four MtM schemes
only, and a model trained on a single scheme never has to tell schemes apart, so they reuse index 0.

Regions are drawn per trial because a batch mixes sessions: R is uniform over the *distinct* regions of the
trial's real neurons (not weighted by neuron count). Only real neurons (`neuron_mask`) in real bins
(`time_mask`) are ever hidden or targets; a trial without real neurons gets no targets.

Target entries are corrupted BERT-style, as in the original: a fraction `zero_ratio` is set to 0; of the rest, a
fraction `random_ratio` is replaced by a count drawn uniformly from {0, ..., max count in the batch}; the rest is
left unchanged. Entries hidden only as context (intra-region: the neurons outside R) are always zeroed, so the
model sees R alone, as in the intra-region evaluation (§7); the original corrupted them like targets (identical
under the default `zero_ratio = 1`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from ibl_jax.errors import UserError

SCHEMES = ("neuron", "causal", "inter-region", "intra-region", "temporal", "random", "random_token")
MTM_SCHEMES = SCHEMES[:4]
PROMPT_IDX = (0, 1, 2, 3, 0, 0, 0)  # prompt token of each scheme id; temporal and random reuse 0 (see above)
CAUSAL_ID = SCHEMES.index("causal")
_ALIASES = {"mtm": MTM_SCHEMES, "all": MTM_SCHEMES}
_NO_REGION = jnp.iinfo(jnp.int32).max  # sorts after every real region id


class Masked(NamedTuple):
  """A masked batch (a pytree). Scalars are traced arrays, so they can feed a jitted model directly."""
  inputs_BxTxN: jax.Array  # float32 counts the model sees
  targets_mask_BxTxN: jax.Array  # bool: the entries the loss scores
  prompt_idx: jax.Array  # int32 scalar: prompt-token index
  causal: jax.Array  # bool scalar: use causal attention
  scheme_id: jax.Array  # int32 scalar: index into SCHEMES


def scheme_ids(names: str | Sequence[str]) -> tuple[int, ...]:
  """Parses scheme names into ids, e.g. "mtm" -> (0, 1, 2, 3), "neuron,causal" -> (0, 1).

  Accepts a comma-separated string or a sequence of names; "mtm" (alias "all") expands to the four MtM schemes.
  Duplicates are dropped, first occurrence kept.

  Raises:
    ValueError: naming the unknown scheme, or when no scheme is given.
  """
  parts = names.split(",") if isinstance(names, str) else [p for n in names for p in n.split(",")]
  ids: list[int] = []
  for part in (p.strip() for p in parts):
    if not part:
      continue
    for name in _ALIASES.get(part, (part,)):
      if name not in SCHEMES:
        raise UserError(f"unknown masking scheme {part!r}; choose from {', '.join(SCHEMES)}, or 'mtm'")
      if SCHEMES.index(name) not in ids:
        ids.append(SCHEMES.index(name))
  if not ids:
    raise UserError(f"no masking scheme in {names!r}; choose from {', '.join(SCHEMES)}, or 'mtm'")
  return tuple(ids)


def sample_scheme(key: jax.Array, allowed_ids: tuple[int, ...]) -> jax.Array:
  """Draws one scheme id uniformly from `allowed_ids` (a static tuple); returns a traced int32 scalar."""
  return jax.random.choice(key, jnp.asarray(allowed_ids, jnp.int32))


def _pick_region(key: jax.Array, neuron_mask_BxN: jax.Array, regions_BxN: jax.Array) -> jax.Array:
  """Marks the neurons of one region per trial, uniform over the trial's distinct regions. Returns bool [B, N].

  Sorting the real neurons' region ids puts each distinct region at the position where the sorted value
  changes; the largest uniform score among those positions picks one region with equal probability.
  """
  sorted_BxN = jnp.sort(jnp.where(neuron_mask_BxN, regions_BxN, _NO_REGION), axis=-1)
  first_BxN = jnp.concatenate([jnp.ones_like(sorted_BxN[:, :1], bool), sorted_BxN[:, 1:] != sorted_BxN[:, :-1]],
                              axis=-1) & (sorted_BxN != _NO_REGION)
  scores_BxN = jnp.where(first_BxN, jax.random.uniform(key, sorted_BxN.shape), -1.0)
  region_Bx1 = jnp.take_along_axis(sorted_BxN, jnp.argmax(scores_BxN, axis=-1)[:, None], axis=-1)
  # A trial without real neurons "picks" _NO_REGION, which matches none of its (padded) neurons.
  return neuron_mask_BxN & (regions_BxN == region_Bx1)


# Every scheme maps (key, valid_BxTxN, neuron_mask_BxN, regions_BxN) to (targets_BxTxN, context_BxTxN): the
# hidden entries the loss scores, and those hidden only to remove context (zeroed, never scored).
# Draws here go through `jax.random`, not `fused_random`: its loop (on a CPU) stores the draw once. Written out
# (`fused_random`), a draw fuses into each consumer of the masks (the inputs, the loss and its gradient), so each
# hashes it again, once per element it is broadcast to: with the neuron scheme alone (no `lax.switch` left to
# store the masks) NDT2 small's train step took 22-27 % longer (docs/performance.md, row 32).


def _hide_neurons(key, valid_BxTxN, neuron_mask_BxN, regions_BxN, *, ratio):
  del regions_BxN
  hide_BxN = jax.random.bernoulli(key, ratio, neuron_mask_BxN.shape)
  return valid_BxTxN & hide_BxN[:, None, :], jnp.zeros_like(valid_BxTxN)


def _hide_bins(key, valid_BxTxN, neuron_mask_BxN, regions_BxN, *, ratio):
  del neuron_mask_BxN, regions_BxN
  hide_BxT = jax.random.bernoulli(key, ratio, valid_BxTxN.shape[:2])
  return valid_BxTxN & hide_BxT[:, :, None], jnp.zeros_like(valid_BxTxN)


def _hide_entries(key, valid_BxTxN, neuron_mask_BxN, regions_BxN, *, ratio):
  del neuron_mask_BxN, regions_BxN
  return valid_BxTxN & jax.random.bernoulli(key, ratio, valid_BxTxN.shape), jnp.zeros_like(valid_BxTxN)


def _hide_tokens(key, valid_BxTxN, neuron_mask_BxN, regions_BxN, *, ratio, token_shape):
  del neuron_mask_BxN, regions_BxN
  B, T, N = valid_BxTxN.shape
  bins, neurons = token_shape[0], token_shape[1] or N
  hide_BxTpxNp = jax.random.bernoulli(key, ratio, (B, -(-T // bins), -(-N // neurons)))
  hide_BxTxN = hide_BxTpxNp[:, jnp.arange(T) // bins][:, :, jnp.arange(N) // neurons]
  return valid_BxTxN & hide_BxTxN, jnp.zeros_like(valid_BxTxN)


def token_shape(masking_cfg: Any) -> tuple[int, int]:
  """(bins, neurons) of one random_token token; neurons 0 means all of a bin's neurons (NDT1's token)."""
  return int(masking_cfg.get("token_bins", 1)), int(masking_cfg.get("token_neurons", 0))


def _hide_one_region(key, valid_BxTxN, neuron_mask_BxN, regions_BxN):
  in_region_BxN = _pick_region(key, neuron_mask_BxN, regions_BxN)
  return valid_BxTxN & in_region_BxN[:, None, :], jnp.zeros_like(valid_BxTxN)


def _keep_one_region(key, valid_BxTxN, neuron_mask_BxN, regions_BxN, *, ratio):
  key_region, key_hide = jax.random.split(key)
  in_region_BxN = _pick_region(key_region, neuron_mask_BxN, regions_BxN)
  hide_BxN = in_region_BxN & jax.random.bernoulli(key_hide, ratio, neuron_mask_BxN.shape)
  return valid_BxTxN & hide_BxN[:, None, :], valid_BxTxN & ~in_region_BxN[:, None, :]


def mask_batch(key: jax.Array, batch: Mapping[str, Any], scheme_id: jax.Array | int, *, ratio: float = 0.3,
               causal_ratio: float = 0.6, zero_ratio: float = 1.0, random_ratio: float = 1.0,
               token_shape: tuple[int, int] = (1, 0)) -> Masked:
  """Masks a batch with scheme `scheme_id` (index into SCHEMES; traced: changing it never recompiles).

  Args:
    key: PRNG key.
    batch: `spikes` [B, T, N] (uint8 or float), `neuron_mask` [B, N] bool, `time_mask` [B, T] bool and
      `neuron_regions` [B, N] int (corpus-wide region ids); other keys are ignored.
    scheme_id: int32 scalar; out-of-range values are clamped by `lax.switch`.
    ratio: hiding probability of the neuron, temporal, random and intra-region (inside R) schemes.
    causal_ratio: hiding probability of each bin in the causal scheme.
    zero_ratio: fraction of the target entries set to 0.
    random_ratio: fraction of the remaining target entries replaced by random counts (the rest stay unchanged).
    token_shape: (bins, neurons) of a random_token token (static); neurons 0: all neurons.

  Returns:
    Masked with float32 inputs, bool targets, and the scheme's prompt index and causal flag.
  """
  spikes_BxTxN = jnp.asarray(batch["spikes"]).astype(jnp.float32)
  neuron_mask_BxN = jnp.asarray(batch["neuron_mask"], bool)
  valid_BxTxN = jnp.asarray(batch["time_mask"], bool)[:, :, None] & neuron_mask_BxN[:, None, :]
  regions_BxN = jnp.asarray(batch["neuron_regions"]).astype(jnp.int32)
  scheme_id = jnp.asarray(scheme_id, jnp.int32)

  branches = (  # order = SCHEMES
      functools.partial(_hide_neurons, ratio=ratio),
      functools.partial(_hide_bins, ratio=causal_ratio),
      _hide_one_region,
      functools.partial(_keep_one_region, ratio=ratio),
      functools.partial(_hide_bins, ratio=ratio),
      functools.partial(_hide_entries, ratio=ratio),
      functools.partial(_hide_tokens, ratio=ratio, token_shape=tuple(token_shape)),
  )
  key_scheme, key_zero, key_random, key_counts = jax.random.split(key, 4)
  targets_BxTxN, context_BxTxN = jax.lax.switch(scheme_id, branches, key_scheme, valid_BxTxN, neuron_mask_BxN,
                                                regions_BxN)

  shape = spikes_BxTxN.shape
  if isinstance(zero_ratio, (int, float)) and zero_ratio >= 1.0:
    # Every target is zeroed (the default): skip the corruption draws, which would all be discarded
    # (15 % of a small-model train step on a CPU; docs/performance.md).
    inputs_BxTxN = jnp.where(targets_BxTxN | context_BxTxN, 0.0, spikes_BxTxN)
  else:
    zero_BxTxN = targets_BxTxN & jax.random.bernoulli(key_zero, zero_ratio, shape)
    random_BxTxN = targets_BxTxN & ~zero_BxTxN & jax.random.bernoulli(key_random, random_ratio, shape)
    max_count = jnp.max(spikes_BxTxN, initial=0.0).astype(jnp.int32)
    counts_BxTxN = jax.random.randint(key_counts, shape, 0, max_count + 1).astype(jnp.float32)
    inputs_BxTxN = jnp.where(zero_BxTxN | context_BxTxN, 0.0,
                             jnp.where(random_BxTxN, counts_BxTxN, spikes_BxTxN))
  return Masked(inputs_BxTxN=inputs_BxTxN,
                targets_mask_BxTxN=targets_BxTxN,
                prompt_idx=jnp.asarray(PROMPT_IDX, jnp.int32)[scheme_id],
                causal=scheme_id == CAUSAL_ID,
                scheme_id=scheme_id)


def configured_scheme_ids(masking_cfg: Any) -> tuple[int, ...]:
  """The scheme ids a masking config trains on: `mtm_schemes` when `scheme` is "mtm"/"all", else `scheme`."""
  names = masking_cfg.scheme
  if names.strip() in _ALIASES:
    names = getattr(masking_cfg, "mtm_schemes", None) or names
  return scheme_ids(names)


def mask_and_prompt(key: jax.Array, batch: Mapping[str, Any], masking_cfg: Any) -> Masked:
  """Masks a batch as `masking_cfg` (configs/*.py `.masking`) says: one fixed scheme, or one sampled per call.

  With several schemes ("mtm" or a comma list), the scheme is drawn uniformly per call (per train step) and is
  shared by the whole batch, as in the original.
  """
  ids = configured_scheme_ids(masking_cfg)
  key_scheme, key_mask = jax.random.split(key)
  scheme_id = sample_scheme(key_scheme, ids) if len(ids) > 1 else jnp.int32(ids[0])
  return mask_batch(key_mask, batch, scheme_id, ratio=masking_cfg.ratio, causal_ratio=masking_cfg.causal_ratio,
                    zero_ratio=masking_cfg.zero_ratio, random_ratio=masking_cfg.random_ratio,
                    token_shape=token_shape(masking_cfg))
