"""A configured device is checked against what torch finds on the machine, before any work."""

import pytest
import torch

from akd_cache.devices import require_device
from akd_cache.errors import ConfigError


@pytest.fixture
def one_cuda_device(monkeypatch):
    """A machine with one CUDA device, as torch's accelerator API would describe it."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)


def test_the_cpu_is_always_there(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    require_device("cpu", "eval.device")


def test_no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        require_device("cuda", "eval.device")
    assert str(err.value) == ("eval.device 'cuda': this machine has no accelerator; set "
                              "eval.device to a device it has (cpu)")


def test_an_accelerator_of_another_kind_or_index(one_cuda_device):
    require_device("cuda", "fidelity.device")
    require_device("cuda:0", "fidelity.device")
    with pytest.raises(ConfigError, match=r"^fidelity.device 'mps': this machine has a cuda "
                                          r"accelerator only;"):
        require_device("mps", "fidelity.device")
    with pytest.raises(ConfigError, match=r"^fidelity.device 'cuda:1': this machine has 1 cuda "
                                          r"device\(s\), numbered from 0$"):
        require_device("cuda:1", "fidelity.device")
