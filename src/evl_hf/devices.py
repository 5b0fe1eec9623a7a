# Copyright 2026 The evl-hf authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The `--device` of the command-line tools: checked when the arguments are parsed, so a typo or a missing GPU is one
line before the model loads, not torch's traceback after."""

import argparse

import torch


def device_argument(text: str) -> str:
    """An argparse `type`: `text` if it names a device this machine has (`cpu`, or its accelerator's type with an
    index it has), else an `ArgumentTypeError` saying why."""
    try:
        device = torch.device(text)
    except RuntimeError as error:  # torch lists the device types it knows
        raise argparse.ArgumentTypeError(f"{text!r} is not a device name: {error}") from None
    if device.type == "cpu":
        return text
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is None or accelerator.type != device.type:
        has = f"its accelerator is {accelerator.type}" if accelerator is not None else "it has no accelerator"
        raise argparse.ArgumentTypeError(f"{text}: this machine has no {device.type} device ({has}).")
    count = torch.accelerator.device_count()
    if device.index is not None and device.index >= count:
        raise argparse.ArgumentTypeError(f"{text}: this machine has {count} {device.type} device(s), 0 to {count - 1}.")
    return text
