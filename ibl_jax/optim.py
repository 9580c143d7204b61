"""The optimiser: AdamW (the paper's lr 1e-4, weight decay 0.01, eps 1e-8), one-cycle schedule, clipping."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(training_cfg) -> optax.Schedule:
  """Linear warmup from 0 over `warmup_fraction` of the steps, then cosine decay to 0 (one-cycle)."""
  total = max(int(training_cfg.num_steps), 1)
  warmup = max(int(training_cfg.warmup_fraction * total), 1)
  return optax.warmup_cosine_decay_schedule(0.0, training_cfg.learning_rate, warmup_steps=warmup,
                                            decay_steps=max(total, warmup + 1), end_value=0.0)


def make_optimizer(training_cfg, *, trainable=None) -> optax.GradientTransformation:
  """AdamW with clipping; `trainable` (a bool tree like the params) freezes the leaves marked False."""
  tx = optax.chain(
      optax.clip_by_global_norm(training_cfg.grad_clip_norm),
      optax.adamw(learning_rate_schedule(training_cfg), eps=training_cfg.adam_eps,
                  weight_decay=training_cfg.weight_decay))
  if trainable is None:
    return tx
  labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
