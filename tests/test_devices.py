import argparse

import pytest
import torch

from evl_hf.devices import device_argument


def test_the_cpu_and_this_machines_accelerator_are_taken():
    assert device_argument("cpu") == "cpu"
    if torch.accelerator.is_available():
        accelerator = torch.accelerator.current_accelerator().type
        assert device_argument(f"{accelerator}:0") == f"{accelerator}:0"


def test_a_typo_or_a_device_this_machine_lacks_is_refused_in_one_line():
    with pytest.raises(argparse.ArgumentTypeError, match="'gpu' is not a device name"):
        device_argument("gpu")
    missing = "xpu" if torch.accelerator.is_available() and torch.accelerator.current_accelerator().type == "cuda" else "cuda"
    with pytest.raises(argparse.ArgumentTypeError, match=f"{missing}:0: this machine has no {missing} device"):
        device_argument(f"{missing}:0")
    if torch.accelerator.is_available():
        accelerator, count = torch.accelerator.current_accelerator().type, torch.accelerator.device_count()
        with pytest.raises(argparse.ArgumentTypeError, match=f"this machine has {count} {accelerator} device"):
            device_argument(f"{accelerator}:{count}")
