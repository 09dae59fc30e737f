"""The run directory, from the bottom up (import the module you need; this face imports nothing):

  glmjax.run.directory  layout, step listing, atomic writes, setting steps aside (no glmjax imports;
                        the trainer builds on it)
  glmjax.run.load       params-only restore onto this host's devices (generate, eval, export)
  glmjax.run.imported   the all-or-nothing run directory `glmjax import` writes
"""
