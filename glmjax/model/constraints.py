"""Activation sharding constraints by logical axis name.

Model code names logical axes only; the mapping to mesh axes comes from the
rules the trainer installs (`flax.linen.logical_axis_rules` + a mesh context,
see glmjax.sharding). Outside such a context this is the identity.
"""

from __future__ import annotations

from flax.linen import spmd


def constrain(x, logical_axes: tuple):
  return spmd.with_logical_constraint(x, logical_axes)
