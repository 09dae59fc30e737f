"""GPipe and the circular schedule over the `stage` mesh axis: stage = 2 / 4 with 4 - 8
microbatches (circular: 2 repeats) gives the unpipelined logits and gradients (1e-5, float32),
also with fsdp = 2 (params sharded along embed inside each stage) and with context = 2 (ring
attention inside the stages); the circular schedule's
layer order and bubble against plain-Python references; bad schedules are one-line errors
naming the field."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax import config_gin
from glmjax.cli import train as train_cli
from glmjax.model import ModelConfig, forward, init_params
from glmjax.sharding import DEFAULT_RULES, MeshConfig, activation_sharding, make_mesh, param_shardings
from glmjax.trainer import pipeline

CONFIG = ModelConfig(vocab_size=61, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                     ffn_dim=48, max_length=16, position="rope_2d", attention_impl="xla")
CONFIG8 = dataclasses.replace(CONFIG, num_layers=8)
BATCH = 8


def glm_batch(seed=0):
  rng = np.random.default_rng(seed)
  shape = (BATCH, 16)
  idx = np.arange(16)[None]
  seg = (np.where(idx < 5, 1, 2) * (idx < rng.integers(9, 17, (BATCH, 1)))).astype(np.int32)  # 2 packed + pad
  bidi = (np.arange(16)[None] % 8 < 3).astype(np.int32) * (seg != 0)
  return {"tokens": rng.integers(2, 61, shape).astype(np.int32) * (seg != 0),
          "targets": rng.integers(2, 61, shape).astype(np.int32),
          "loss_mask": ((seg != 0) & (bidi == 0)).astype(np.float32),
          "segment_ids": seg, "bidirectional": bidi,
          "positions": (np.arange(16)[None] % 8 * np.ones(shape)).astype(np.int32),
          "block_positions": (np.arange(16)[None] % 8 >= 3).astype(np.int32) * np.ones(shape, np.int32)}


def nll(logits, batch):
  logp = jax.nn.log_softmax(logits)
  token = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  return jnp.sum(token * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])


def unpipelined(config):
  params = init_params(config, jax.random.key(0))
  batch = glm_batch()
  run = jax.jit(lambda p, b: (forward(p, b, config), jax.grad(lambda p: nll(forward(p, b, config), b))(p)))
  return params, batch, jax.device_get(run(params, batch))


@pytest.fixture(scope="module")
def reference():
  return unpipelined(CONFIG)


@pytest.fixture(scope="module")
def reference8():
  return unpipelined(CONFIG8)


def assert_pipeline_equals(reference, config, mesh, microbatches, repeats=1):
  """Logits and gradients of the pipelined forward on `mesh` vs the unpipelined reference."""
  params, batch, (want_logits, want_grads) = reference
  placed = jax.device_put(params, param_shardings(config, mesh, DEFAULT_RULES))

  def run(p, b):
    pipelined = lambda p: pipeline.forward_with_aux(p, b, config, microbatches=microbatches,  # noqa: E731
                                                    repeats=repeats)[0]
    return pipelined(p), jax.grad(lambda p: nll(pipelined(p), b))(p)

  with activation_sharding(mesh, DEFAULT_RULES):
    assert pipeline.stage_count() == mesh.shape["stage"]
    got_logits, got_grads = jax.device_get(jax.jit(run)(placed, batch))
  np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(got_grads)[0], jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("stage, fsdp, microbatches", [(2, 1, 4), (4, 1, 8), (4, 2, 4)])
def test_gpipe_equals_the_unpipelined_model(reference, stage, fsdp, microbatches):
  mesh = make_mesh(MeshConfig(data=8 // (stage * fsdp), fsdp=fsdp, stage=stage))
  if fsdp > 1:
    placed = jax.device_put(reference[0], param_shardings(CONFIG, mesh, DEFAULT_RULES))
    assert tuple(placed["layers"]["attn"]["wq"].sharding.spec)[:2] == ("stage", "fsdp")
  assert_pipeline_equals(reference, CONFIG, mesh, microbatches)


# (stage, fsdp, microbatches, config): chunks of 1 layer (4 layers) and of 1 / 2 layers (8
# layers); M > S (the loop buffer holds a microbatch for M - S ticks) and M = S with fsdp.
@pytest.mark.parametrize("stage, fsdp, microbatches, eight_layers", [(2, 1, 4, False), (4, 1, 8, True),
                                                                     (4, 2, 4, True)])
def test_circular_equals_the_unpipelined_model(reference, reference8, stage, fsdp, microbatches, eight_layers):
  mesh = make_mesh(MeshConfig(data=8 // (stage * fsdp), fsdp=fsdp, stage=stage, pipeline_schedule="circular",
                              pipeline_repeats=2))
  assert_pipeline_equals(reference8 if eight_layers else reference, CONFIG8 if eight_layers else CONFIG, mesh,
                         microbatches, repeats=2)


def test_circular_layout_gives_each_stage_its_chunks():
  """Stage s's contiguous block of the reordered layers is chunks s, S + s, ... (Narayanan et al.
  2021's interleaved assignment), against the index formula."""
  for layers, stages, repeats in ((8, 2, 2), (8, 4, 2), (12, 2, 3), (4, 2, 1)):
    order = pipeline.circular_order(layers, stages, repeats)
    got = np.asarray(pipeline.circular_layout({"w": jnp.arange(layers)}, stages, repeats)["w"])
    np.testing.assert_array_equal(got, order)
    chunk = layers // (stages * repeats)
    for s, block in enumerate(got.reshape(stages, -1)):
      want = [layer for r in range(repeats) for layer in range((r * stages + s) * chunk, (r * stages + s + 1) * chunk)]
      assert block.tolist() == want


def simulate_circular(stages, microbatches, repeats):
  """The circular schedule tick by tick in plain Python: stage s at tick t runs item t - s
  (microbatch k mod M, virtual stage (k div M) S + s); checks every virtual stage's input was
  produced at an earlier tick; returns the idle share of the stage-ticks."""
  done = {}  # (microbatch, virtual stage) -> tick it finished
  ticks = repeats * microbatches + stages - 1
  idle = 0
  for t in range(ticks):
    for s in range(stages):
      k = t - s
      if not 0 <= k < repeats * microbatches:
        idle += 1
        continue
      m, virtual = k % microbatches, (k // microbatches) * stages + s
      assert virtual == 0 or done[(m, virtual - 1)] < t
      done[(m, virtual)] = t
  assert len(done) == microbatches * stages * repeats  # every microbatch through every chunk
  return idle / (stages * ticks)
def test_bubble_fraction_of_the_schedule():
  """GPipe's idle fraction (S - 1) / (M + S - 1): the ticks a stage has no microbatch."""
  for stages, microbatches in ((2, 4), (4, 8), (4, 4)):
    ticks = microbatches + stages - 1
    idle = sum(1 for s in range(stages) for t in range(ticks) if not 0 <= t - s < microbatches)
    assert idle / (stages * ticks) == pytest.approx((stages - 1) / (microbatches + stages - 1))
    assert pipeline.bubble_fraction(stages, microbatches) == pytest.approx(idle / (stages * ticks))
  for stages, microbatches, repeats in ((2, 4, 2), (4, 8, 2), (4, 4, 2), (4, 4, 4)):
    assert simulate_circular(stages, microbatches, repeats) == pytest.approx(
        (stages - 1) / (repeats * microbatches + stages - 1))
    assert pipeline.bubble_fraction(stages, microbatches, repeats) == pytest.approx(
        simulate_circular(stages, microbatches, repeats))
  with pytest.raises(KeyError):  # fewer microbatches than stages: repeat 1 would wait on repeat 0
    simulate_circular(4, 2, 2)


@pytest.mark.parametrize("stage, microbatches, config, message", [
    (4, 2, CONFIG, "microbatches=2 is fewer than MeshConfig.stage=4"),
    (4, 4, dataclasses.replace(CONFIG, num_layers=6), "MeshConfig.stage=4 must divide ModelConfig.num_layers=6"),
    (2, 3, CONFIG, "microbatches=3 must divide the batch size 8"),
])
def test_bad_schedule_is_one_line(stage, microbatches, config, message):
  mesh = make_mesh(MeshConfig(data=8 // stage, stage=stage))
  params = init_params(config, jax.random.key(0))
  with activation_sharding(mesh, DEFAULT_RULES), pytest.raises(ValueError) as err:
    jax.jit(lambda p, b: pipeline.forward_with_aux(p, b, config, microbatches=microbatches)).lower(
        params, glm_batch())
  assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_train_step_with_stages_equals_one_device():
  """TrainProgram on stage=2 x fsdp=2 x data=2: TrainerConfig.microbatches are GPipe's; one step
  gives the loss and params of the one-device step with 2 accumulated microbatches."""
  from glmjax.trainer import OptimizerConfig, StepConfig, TrainProgram  # pylint: disable=import-outside-toplevel
  optimizer = OptimizerConfig(learning_rate=3e-3, schedule="constant", grad_clip_norm=1.0)

  def one_step(mesh_config, devices=None):
    program = TrainProgram(CONFIG, optimizer, mesh_config, num_steps=1, global_batch_size=BATCH,
                           step_config=StepConfig(microbatches=2), devices=devices)
    if mesh_config.stage > 1:  # the step runs the GPipe clock: activations are ppermuted
      with program.sharding_context():
        text = program._step.lower(program.abstract_state(), program.global_batch(glm_batch(seed=2))).as_text()  # pylint: disable=protected-access
      assert "collective_permute" in text
    state, metrics = program.train_step(program.init_state(seed=0), glm_batch(seed=2))
    return float(metrics["loss"]), jax.device_get(state["params"])

  want_loss, want = one_step(MeshConfig(data=1), devices=jax.devices()[:1])
  got_loss, got = one_step(MeshConfig(data=2, fsdp=2, stage=2))
  assert got_loss == pytest.approx(want_loss, rel=1e-6)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_stages_with_context_parallelism_equal_one_device(reference):
  """stage=2 x context=2 x data=2, circular (GPipe is its R = 1): each stage's layers run ring
  attention on its half of the zig-zag sequence (segments and bidirectional prefixes cross the
  chunk boundaries)."""
  mesh = make_mesh(MeshConfig(data=2, stage=2, context=2, pipeline_schedule="circular", pipeline_repeats=2))
  assert_pipeline_equals(reference, CONFIG, mesh, microbatches=4, repeats=2)


@pytest.mark.parametrize("fields, message", [
    ({"pipeline_schedule": "1f1b"}, "MeshConfig.pipeline_schedule='1f1b' is not one of 'gpipe', 'circular'"),
    ({"pipeline_repeats": 2}, "MeshConfig.pipeline_repeats=2 needs MeshConfig.pipeline_schedule='circular'"),
    ({"pipeline_schedule": "circular", "pipeline_repeats": 0}, "MeshConfig.pipeline_repeats=0 must be a positive int"),
    ({"pipeline_schedule": "circular", "pipeline_repeats": 4},
     "MeshConfig.pipeline_repeats=4 must divide ModelConfig.num_layers / MeshConfig.stage = 2"),
])
def test_bad_pipeline_fields_are_one_line_before_anything_is_built(fields, message):
  """TrainProgram refuses them in its constructor (before params or a compile); `glmjax train`
  exits 2 with that line (next test)."""
  from glmjax.trainer import OptimizerConfig, TrainProgram  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError) as err:
    TrainProgram(CONFIG, OptimizerConfig(), MeshConfig(data=4, stage=2, **fields), num_steps=1, global_batch_size=BATCH)
  assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("binding, field", [
    ("MeshConfig.pipeline_schedule = '1f1b'", "MeshConfig.pipeline_schedule"),
    ("MeshConfig.pipeline_repeats = 2", "MeshConfig.pipeline_repeats"),
])
def test_bad_pipeline_binding_is_exit_2_with_one_line(binding, field, capsys, tmp_path):
  config_gin.clear()
  try:
    code = train_cli.main(["--gin_file", "experiments/demo.gin", "--gin", binding, "--workdir", str(tmp_path / "run")])
  finally:
    config_gin.clear()
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and field in err, err
  assert not (tmp_path / "run").exists()  # refused before anything was written
