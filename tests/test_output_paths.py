import argparse
import os

import pytest

from evl_hf.output_paths import check_output_path


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    # Its folder existed, so the check passed, and the command failed writing it at the end (a long timeline's
    # windows lost). Permissions are asked of the system (root may write anywhere): here it says no.
    parser = argparse.ArgumentParser(prog="tool")
    (tmp_path / "old.json").write_text("{}")
    allowed = {"folder": True, "file": True}

    def access(path, mode):
        return allowed["folder"] if os.path.isdir(path) else allowed["file"]

    monkeypatch.setattr(os, "access", access)
    check_output_path(parser, "--output", str(tmp_path / "new.json"))
    check_output_path(parser, "--output", str(tmp_path / "old.json"))
    for denied, name in (("folder", "new.json"), ("file", "old.json")):
        allowed.update(folder=True, file=True)
        allowed[denied] = False
        with pytest.raises(SystemExit) as refused:
            check_output_path(parser, "--output", str(tmp_path / name))
        assert refused.value.code == 2
        assert f"--output {tmp_path / name}: no permission to write it" in capsys.readouterr().err
