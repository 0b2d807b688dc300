"""The GPU check's tiny part on the CPU: the real Ray Train path (gloo), 1 step with a checkpoint, then a resume."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).parents[2] / "bench" / "gpu_check.py"


def test_gpu_check_trainer_part_runs_on_the_cpu(toy_store):
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH)
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gpu_check
    spec.loader.exec_module(gpu_check)

    result = gpu_check.trainer_check(toy_store.storage, use_gpu=False, steps=2, store=str(toy_store.store))
    assert result["passed"], result["checks"]
    assert result["first_metrics"]["step"] == 1 and result["resumed_metrics"]["step"] == 2
    # The memory each worker used is measured and logged: the tiny model's worker holds well under 4 GiB of host memory.
    assert 0.1 < result["resumed_metrics"]["peak_host_rss_gib"] < 4
    assert "peak_gpu_memory_gib" not in result["resumed_metrics"]  # a CPU run has no GPU figure
    assert math.isfinite(result["resumed_metrics"]["loss"])
