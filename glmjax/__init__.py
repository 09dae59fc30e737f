"""glmjax: a JAX training stack for GLM-family language models."""

__version__ = "0.1.0"
