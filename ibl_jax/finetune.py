"""Fine-tune a pretrained model (any family of ibl_jax.models) on new sessions, then run the evaluation suite on their test splits.

  python -m ibl_jax.finetune --config=configs/finetune.py                        # held-out synthetic sessions
  python -m ibl_jax.finetune --config=configs/finetune.py --config.pretrained=results/ndt1_mtm \\
      --config.data.sessions=/data/ibl/<eid> --config.finetune.freeze_encoder=True
  python -m ibl_jax.finetune --config=configs/finetune.py --config.pretrained=""   # from scratch (baseline)
  python -m ibl_jax.finetune --config=configs/finetune_scratch.py                 # from scratch, small-session recipe
  python -m ibl_jax.finetune --config=configs/finetune_decode.py                  # a decoding head (behaviour)

The shared encoder is restored from the pretrained run's best checkpoint; each target session keeps its
stitch rows and session token when the checkpoint has seen it, and gets freshly initialised ones otherwise.
Training uses the same loop as pretraining (resume, SIGTERM, TensorBoard, best checkpoint by validation);
afterwards `eval/<eid>/*.npz` and `summary.json` are written under the fine-tuning run's directory. With
`training.objective=supervised` a decoding head (`model.decode_targets`) trains on behaviour; it is then scored
on each test split too (task `supervised`, ibl_jax/supervised.py).
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from ibl_jax import cli as cli_lib, configs, models, runs, supervised, train
from ibl_jax.errors import UserError
from ibl_jax.models import heads

DEFAULT_FAMILY = "ndt1"  # from scratch with no model.name set


def merge_model_config(pretrained_model, requested) -> dict:
  """The pretrained model config with the requested overrides; a differing architecture field is an error."""
  merged = pretrained_model.to_dict()
  architecture = ("name", *models.of(pretrained_model).ARCHITECTURE)
  for key, value in requested.items():
    if value is None:
      continue
    if key in architecture and merged.get(key) != value:
      raise UserError(f"config.model.{key}={value!r} but the pretrained checkpoint has {key}={merged.get(key)!r}; "
                       f"drop the override or pretrain with it")
    merged[key] = value
  return merged


def transplant(fresh, pretrained, *, pretrained_eids: list[str], target_eids: list[str],
               session_params: tuple[str, ...]):
  """Starting parameters for the target sessions.

  Shared (encoder) leaves come from `pretrained` unchanged. For the per-session leaves, row s of a target
  session seen in pretraining is that session's pretrained row (its real-neuron columns; the rest stay
  fresh), and an unseen session keeps its fresh row. `session_params`: the family's SESSION_PARAMS.
  """
  out = jax.tree.map(np.asarray, dict(fresh))
  pre = jax.tree.map(np.asarray, pretrained)
  for name in out:
    if name == heads.HEAD and name not in pre:
      continue  # a decoding head new in fine-tuning starts fresh
    if name not in session_params:
      _check_same_shapes(out[name], pre[name], name)
      out[name] = pre[name]
  for t_idx, eid in enumerate(target_eids):
    if eid not in pretrained_eids:
      continue
    p_idx = pretrained_eids.index(eid)
    for name in session_params:
      if name not in out:
        continue
      for leaf, value in out[name].items():
        src = pre[name][leaf][p_idx]
        value = value.copy()
        region = tuple(slice(0, min(a, b)) for a, b in zip(value[t_idx].shape, src.shape))
        value[t_idx][region] = src[region]
        out[name][leaf] = value
  return out


def _check_same_shapes(fresh, pretrained, name: str) -> None:
  a, b = jax.tree.map(np.shape, fresh), jax.tree.map(np.shape, pretrained)
  if a != b:
    raise UserError(f"parameter {name!r}: shapes {b} in the checkpoint but {a} in the fine-tuning model")


def encoder_trainable(params, freeze_encoder: bool, session_params: tuple[str, ...]):
  """True for the leaves that train: everything, or with a frozen encoder only the per-session rows; with a
  decoding head, a frozen encoder trains the head alone (the rates model, stitching included, stays fixed)."""
  has_head = heads.HEAD in params
  def trains(name: str) -> bool:
    if not freeze_encoder or name == heads.HEAD:
      return True
    return name in session_params and not has_head
  return {name: jax.tree.map(lambda _, t=trains(name): t, sub) for name, sub in params.items()}


def finetune(config) -> dict:
  """Fine-tunes (or trains from scratch when `config.pretrained` is empty), evaluates; returns both summaries."""
  run = runs.open_run(config.pretrained) if config.pretrained else None
  with config.unlocked():
    if run is not None:
      config.model = type(config.model)(merge_model_config(run.config.model, config.model.to_dict()))
    else:
      defaults = train_defaults_model(config.model.get("name") or DEFAULT_FAMILY)
      config.model = type(config.model)({**defaults, **{k: v for k, v in config.model.to_dict().items()
                                                         if v is not None}})
  corpus = train.load_training_corpus(config, region_vocab=run.region_vocab if run else None)
  session_params = models.of(config.model).SESSION_PARAMS
  targets = heads.parse_targets(config.model.get("decode_targets"))
  supervised_run = config.training.get("objective", "mtm") == "supervised"
  if supervised_run and config.finetune.freeze_encoder:
    unseen = [e for e in corpus.eids if run is None or e not in run.eids]
    if unseen:
      raise UserError(f"finetune.freeze_encoder=True trains the decoding head alone, but the pretrained model has no "
                      f"stitching for session {unseen[0]} ({len(unseen)} unseen); fine-tune on it with masked "
                      f"modelling first (configs/finetune.py) and pass that run as config.pretrained")
  init = None
  if run is not None:
    which = runs.step_of(config.pretrained)  # RUN_DIR -> its best checkpoint; RUN_DIR/checkpoints/<step> -> that step
    _, pretrained_params, step = runs.load_params(run, which)
    print(f"fine-tuning from {run.run_dir} ({'best checkpoint, ' if which == 'best' else ''}step {step}); sessions seen in pretraining: "
          f"{sum(e in run.eids for e in corpus.eids)}/{len(corpus.eids)}", file=sys.stderr)
    init = lambda fresh: transplant(fresh, pretrained_params, pretrained_eids=run.eids, target_eids=corpus.eids,
                                    session_params=session_params)
  summary = train.train_and_evaluate(
      config, corpus=corpus, init_params=init,
      trainable=lambda p: encoder_trainable(p, config.finetune.freeze_encoder, session_params))
  from ibl_jax import evaluate  # pylint: disable=g-import-not-at-top
  run_dir = train.run_dir_of(config)
  results = _saved_evaluation(run_dir, corpus.eids) if summary.get("already_complete") else None
  if results is None:
    results = evaluate.evaluate_run(str(run_dir), tasks=config.eval.tasks, chunk_size=config.eval.chunk_size)
    if supervised_run and jax.process_index() == 0:
      head_scores = _evaluate_head(config, run_dir, corpus, targets)
      for eid, task in head_scores.items():
        results[eid]["tasks"][supervised.TASK] = task
  return {"train": summary, "eval": results}


def _evaluate_head(config, run_dir, corpus, targets) -> dict[str, dict]:
  """The fine-tuned decoding head's test scores per session (best checkpoint), written beside the suite's."""
  from ibl_jax import steps as steps_lib  # pylint: disable=g-import-not-at-top
  graphdef, params, step = runs.load_params(runs.open_run(run_dir))
  steps = steps_lib.Steps(graphdef=graphdef, tx=None, masking_cfg=config.masking, objective="supervised",
                          decode_targets=targets, decode_prompt=config.training.get("decode_prompt", "neuron"))
  return supervised.evaluate_head(jax.jit(steps.decode), params, corpus, targets, config.data.batch_size,
                                  run_dir / "eval", meta={"checkpoint": str(run_dir), "step": int(step)})


def _saved_evaluation(run_dir, eids: list[str]) -> dict | None:
  """The evaluation summaries a finished fine-tuning run already wrote, or None when any is missing."""
  paths = [run_dir / "eval" / eid / "summary.json" for eid in eids]
  if not all(p.exists() for p in paths):
    return None
  return {eid: json.loads(p.read_text()) for eid, p in zip(eids, paths)}


def train_defaults_model(name: str = DEFAULT_FAMILY) -> dict:
  """The default (small) model config of family `name`, for training from scratch."""
  return models.family(name).default_config("small").to_dict()


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  cli_lib.quiet_logs(cli_lib.absl_verbosity())
  cli_lib.split_cpu(flags.FLAGS.config.mesh)
  out, status = cli_lib.run_guarded(finetune, flags.FLAGS.config)
  if status:
    sys.exit(status)
  if jax.process_index() == 0:
    for eid, summary in out["eval"].items():
      cs = summary["tasks"].get("co_smooth", {})
      bps, oracle = cs.get("bps_per_neuron"), cs.get("oracle_bps_per_neuron")
      print(f"{eid}: co-smoothing {bps if bps is None else round(bps, 3)} bits/spike (oracle "
            f"{oracle if oracle is None else round(oracle, 3)})")
      head = summary["tasks"].get(supervised.TASK)
      if head:
        print(f"{eid}: decoding head " + ", ".join(f"{k} {v:.3f}" for k, v in head.items()
                                                  if k.endswith(("accuracy", "_r2")) and v is not None))
    print(f"results in {out['train']['run_dir']}")


def cli():
  from absl import app  # pylint: disable=g-import-not-at-top
  configs.define_config_flag("configs/finetune.py", "Fine-tuning configuration: a configs/*.py file, or the name "
                             "of a shipped one (finetune, finetune_scratch, finetune_decode).")
  app.run(main)


if __name__ == "__main__":
  cli()
