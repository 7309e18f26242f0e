"""scripts/time_to_ready.py: a real `stagemesh up`, timed to its ready line, then stopped."""

import pytest
import time_to_ready

from stagemesh.runtime.net import free_port
from tests.checkpoints import make_hf_checkpoint

pytestmark = pytest.mark.slow


def test_a_mesh_is_timed_to_its_ready_line_with_the_cpu_its_processes_spent(tmp_path):
    model = make_hf_checkpoint("llama", tmp_path / "llama", num_layers=2)
    ready_s, cpu_s = time_to_ready.time_to_ready(time_to_ready.ROOT, str(model), pp=1, port=free_port())
    assert 0 < ready_s < 120
    assert cpu_s > 1.0  # every process's interpreter and imports, a stage's torch among them, counted
