"""The run `glmjax import` creates: params as step 0, model.gin, tokenizer/, all or nothing."""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Sequence

from glmjax.run.directory import (CHECKPOINTS, MODEL_GIN, TOKENIZER, atomic_write_text,
                                  check_new_run_folder)


def check_same_shapes(model, imported) -> None:
  """Bindings may change how the model runs (dtype, remat, attention_impl), not its params."""
  import jax  # pylint: disable=import-outside-toplevel
  from glmjax.model import is_spec, param_specs  # pylint: disable=import-outside-toplevel
  shapes = lambda c: jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), param_specs(c),  # noqa: E731
                                            is_leaf=is_spec)
  if shapes(model) != shapes(imported):
    raise ValueError("the gin files / bindings change the imported ModelConfig's parameter shapes; "
                     "bind only runtime fields of ModelConfig (dtype, remat_policy, attention_impl)")


def write_imported_run(params: dict, config, out_dir: str, model_gin_text: str, *,
                       gin_files: Sequence[str] = (), bindings: Sequence[str] = (),
                       tokenizer_files: Sequence[str] = (), source: str = "") -> str:
  """A new run directory holding `params` as step 0 (params + a fresh optimizer state for the
  experiment's OptimizerConfig), model.gin and tokenizer/. Built in a temporary sibling folder and
  renamed into place, so a failure leaves nothing behind and never touches an existing folder."""
  import jax  # pylint: disable=import-outside-toplevel

  from glmjax import config_gin  # pylint: disable=import-outside-toplevel
  from glmjax.trainer import TrainProgram  # pylint: disable=import-outside-toplevel
  from glmjax.trainer import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
  from glmjax.trainer.step import new_state  # pylint: disable=import-outside-toplevel

  out_dir = check_new_run_folder(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = f"{out_dir}.tmp-{os.getpid()}"
  if os.path.exists(tmp):
    raise ValueError(f"{tmp} exists (left by an earlier import?); remove it or import elsewhere")
  os.makedirs(tmp)
  try:
    gin_path = os.path.join(tmp, MODEL_GIN)
    atomic_write_text(gin_path, model_gin_text)
    config_gin.clear()
    try:
      config_gin.parse(list(gin_files) + [gin_path], list(bindings))
      experiment = config_gin.build_experiment()
      text = config_gin.operative_config()
    finally:
      config_gin.clear()
    check_same_shapes(experiment.model, config)
    # A checkpoint does not depend on the mesh that wrote it (a run restores it onto its own), so
    # the state is built on one device: one copy of params + optimizer state in memory, not one
    # per device of the experiment's (data-parallel, replicating) mesh.
    program = TrainProgram(experiment.model, experiment.optimizer,
                           dataclasses.replace(experiment.mesh, data=1, fsdp=1, stage=1, context=1,
                                               tensor=1, expert=1, dcn_data=1, dcn_fsdp=1,
                                               pipeline_schedule="gpipe", pipeline_repeats=1),
                           num_steps=experiment.trainer.num_steps, global_batch_size=1,
                           devices=jax.devices()[:1])
    with program.sharding_context():
      placed = jax.device_put(params, program.param_shardings)
      build = jax.jit(lambda p, rng: new_state(p, program.optimizer.init(p), rng),
                      out_shardings=program.state_shardings)
      state = build(placed, jax.random.PRNGKey(experiment.trainer.seed))
    manager = ckpt.make_manager(os.path.join(tmp, CHECKPOINTS), ckpt.CheckpointConfig(async_save=False))
    try:
      info = {"gin": text, "imported_from": source, "process_count": jax.process_count(),
              "devices": jax.device_count()}
      ckpt.save(manager, 0, state, {"batches": 0}, info, force=True)
      manager.wait_until_finished()
    finally:
      manager.close()
    if tokenizer_files:
      os.makedirs(os.path.join(tmp, TOKENIZER))
      for path in tokenizer_files:
        shutil.copyfile(path, os.path.join(tmp, TOKENIZER, os.path.basename(path)))
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)  # empty (checked above)
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir
