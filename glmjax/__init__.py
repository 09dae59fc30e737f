"""glmjax: a JAX training stack for GLM-family language models."""

__version__ = "0.1.0"

# With libtpu installed (for `glmjax compile`) on a host without TPU chips, pin JAX to CPU before
# anything probes for a TPU (glmjax/platforms.py says why); reads /sys and /dev only.
from glmjax import platforms as _platforms  # noqa: E402

_platforms.skip_absent_tpu()
