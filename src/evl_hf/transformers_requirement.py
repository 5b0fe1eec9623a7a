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
"""The transformers versions EVL's code runs on, checked on import.

pip enforces setup.py's pin when evl-hf is installed, but a checkpoint's remote code (`trust_remote_code=True`) runs
on whatever transformers the user has, where an older one fails on a missing internal name. The modules a checkpoint
carries import this one first, so such a user is told which version to install instead.
"""

from transformers.utils.versions import require_version


# setup.py's pin (tests/test_transformers_requirement.py keeps the two equal).
TRANSFORMERS_REQUIREMENT = "transformers>=5.24,<6"

require_version(
    TRANSFORMERS_REQUIREMENT,
    f'EVL\'s code (evl-hf, or a checkpoint\'s remote code) needs it: pip install -U "{TRANSFORMERS_REQUIREMENT}"',
)
