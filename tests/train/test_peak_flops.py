"""MFU denominators by device kind: the bf16 dense peaks of the vendors' data sheets, with v5p
(device_kind "TPU v5") told apart from v5e ("TPU v5 lite")."""

import types

import pytest

from glmjax.trainer.metrics import peak_flops


@pytest.mark.parametrize("kind, per_chip", [("TPU v5 lite", 197e12), ("TPU v5", 459e12),
                                            ("TPU v4", 275e12), ("TPU v6 lite", 918e12),
                                            ("NVIDIA H100 80GB HBM3", 989e12), ("Unknown", 0.0)])
def test_peak_by_device_kind(kind, per_chip):
  devices = [types.SimpleNamespace(device_kind=kind, platform="tpu")] * 4
  assert peak_flops(devices) == per_chip * 4


def test_override_wins():
  assert peak_flops([types.SimpleNamespace(device_kind="TPU v5", platform="tpu")] * 2, 1e12) == 2e12
