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
"""What Linux says about the CPU (`/proc/cpuinfo`), read in one place: the bf16 check, the deterministic video encoder
and the benchmarks' machine line."""

import functools


@functools.cache
def _first_processor() -> dict[str, str]:
    """The first processor's fields, `{}` where there is no /proc/cpuinfo (macOS, Windows)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():  # the end of the first processor's block
                    break
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        return {}
    return fields


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (`avx2`, `avx512_bf16`, `amx_bf16`, ...); empty where they cannot be read."""
    return frozenset(_first_processor().get("flags", "").split())


def cpu_model_name() -> str:
    """The CPU's model name, `"?"` where it cannot be read."""
    return _first_processor().get("model name", "?")
