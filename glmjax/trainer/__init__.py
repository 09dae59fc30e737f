"""Training: loss, optax optimizers, the sharded step, data streams, checkpoints, metrics, the loop.

    from glmjax.trainer import Experiment, train
    result = train(Experiment(model=presets.get("tiny-glm"), ...), workdir="runs/x")

One batch's path: data.py (seqio -> host rows) -> step.py (global arrays,
jitted step on the mesh) -> metrics.py / checkpoint.py -> loop.py.
"""

from glmjax.trainer.checkpoint import CheckpointConfig
from glmjax.trainer.data import DataConfig, ResumableStream, from_iterable, from_tf_dataset
from glmjax.trainer.loop import Experiment, NonFiniteLossError, TrainerConfig, TrainResult, train
from glmjax.trainer.optim import OptimizerConfig, make_optimizer
from glmjax.trainer.step import StepConfig, TrainProgram

__all__ = ["CheckpointConfig", "DataConfig", "Experiment", "NonFiniteLossError", "OptimizerConfig",
           "ResumableStream", "StepConfig", "TrainProgram", "TrainResult", "TrainerConfig",
           "from_iterable", "from_tf_dataset", "make_optimizer", "train"]
