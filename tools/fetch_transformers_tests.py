"""
Fetch the common model tests (`tests/test_modeling_common.py`, ...) of the installed transformers release from its
PyPI source distribution, so our test suite can run transformers' own model contract against EVL. Nothing is copied
into this repository: the files land in a cache folder (default `.cache/transformers-tests/<version>`).

    python tools/fetch_transformers_tests.py [--dest DIR]
"""

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers


PACKAGE = "transformers_upstream_tests"
DEFAULT_ROOT = Path(__file__).resolve().parent.parent / ".cache" / "transformers-tests"


def fetch(root: Path = DEFAULT_ROOT) -> Path:
    """Return the folder that holds the `transformers_upstream_tests` package, downloading it if needed."""
    destination = root / transformers.__version__
    package = destination / PACKAGE
    if (package / "test_modeling_common.py").exists():
        return destination
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"transformers=={transformers.__version__}", "--dest", download],
            check=True,
        )  # fmt: skip
        (archive,) = Path(download).glob("transformers-*.tar.gz")
        prefix = f"transformers-{transformers.__version__}/tests/"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            package.mkdir(parents=True, exist_ok=True)
            for member in members:
                target = package / member.name[len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    (package / "__init__.py").touch()
    return destination


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dest", type=Path, default=DEFAULT_ROOT)
    print(fetch(parser.parse_args().dest))
