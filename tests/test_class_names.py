import json

import pytest

from evl_hf.class_names import read_class_names


def test_class_names_files_in_the_common_formats(tmp_path):
    formats = {
        "list.json": json.dumps(["run", "jump", "swim"]),
        "name_to_label.json": json.dumps({"jump": 1, "run": 0, "swim": 2}),
        "label_to_name.json": json.dumps({"2": "swim", "0": "run", "1": "jump"}),
        "lines.txt": "run\njump\n\nswim\n",
        "windows.txt": "run\r\njump\r\nswim\r\n",
        "bom.json": "\ufeff" + json.dumps(["run", "jump", "swim"], indent=2),
        "bom.txt": "\ufeffrun\njump\nswim\n",
    }
    for name, text in formats.items():
        (tmp_path / name).write_text(text)
        assert read_class_names(tmp_path / name) == ["run", "jump", "swim"], name
    broken = {
        "gap.json": (json.dumps({"run": 0, "swim": 2}), "must be 0 to 1, each once"),
        "mixed.json": (json.dumps({"run": 0, "jump": "one"}), "maps each name to its integer label"),
        "numbers.json": (json.dumps([1, 2]), "expected class names"),
        "twice.txt": ("run\nrun\n", "given more than once: \\['run'\\]"),
        "empty.txt": ("\n", "expected class names"),
        "trailing_comma.json": ('["run", "jump",]', "not valid JSON"),
        "superscript.json": (json.dumps({"\u00b2": "run"}), "maps each name to its integer label"),
    }
    for name, (text, message) in broken.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"{name}: .*{message}"):
            read_class_names(tmp_path / name)
    with pytest.raises(ValueError, match="missing.json: cannot read the class names"):
        read_class_names(tmp_path / "missing.json")
