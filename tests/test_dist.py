"""Where dsdpo's collectives run: on the accelerator's device, which is what NCCL requires on GPUs."""

import torch
from deepspeed.accelerator import get_accelerator

from dsdpo.runtime.dist import all_reduce_max, all_reduce_mean, collective_tensor, device


def test_collectives_use_the_accelerators_device():
    # On the CPU accelerator that is the CPU; on a CUDA machine "cuda:N" (a CPU tensor there makes
    # NCCL fail at the first collective).
    expected = torch.device(get_accelerator().current_device_name())
    assert device() == expected
    assert collective_tensor([1, 2.5]).device == expected
    assert collective_tensor([1, 2.5]).dtype == torch.float64


def test_one_process_collectives_are_the_values():
    assert all_reduce_max([1, 2.5]) == [1.0, 2.5]
    assert all_reduce_mean({"loss": 0.5}) == {"loss": 0.5}
