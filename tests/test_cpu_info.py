import os
import re

import pytest

from evl_hf.cpu_info import cpu_flags, cpu_model_name


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="Linux only")
def test_the_first_processors_flags_and_model_name_are_read():
    text = open("/proc/cpuinfo").read()
    first = text.split("\n\n")[0]
    flags = re.search(r"^flags\s*:(.*)$", first, re.MULTILINE)
    assert cpu_flags() == frozenset(flags.group(1).split() if flags else ())
    name = re.search(r"^model name\s*:\s*(.*)$", first, re.MULTILINE)
    assert cpu_model_name() == (name.group(1).strip() if name else "?")
