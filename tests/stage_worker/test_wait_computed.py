"""A stage's busy time covers its GPU kernels: the step thread waits for a CUDA output, and
only for a CUDA output, before it stops the clock."""

from __future__ import annotations

from unittest import mock

import torch

from stage_worker.pipeline import wait_computed
from stagemesh.serving.types import StepResult


def test_a_cuda_output_is_waited_for_on_its_own_device(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", synced.append)
    on_gpu = mock.Mock(spec=torch.Tensor, is_cuda=True, device=torch.device("cuda:1"))  # no GPU needed
    wait_computed(on_gpu)
    assert synced == [torch.device("cuda:1")]


def test_cpu_outputs_and_sampled_tokens_are_not_waited_for(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", mock.Mock(side_effect=AssertionError("synchronized")))
    wait_computed(torch.zeros(2, 4))
    wait_computed(StepResult(0, {1: 5}))
