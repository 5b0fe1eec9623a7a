"""Class names in label order, read from the files users give them in (the training script's `--class_names_file`,
`evl-convert --labels`). No optional dependency: the converter is in the core install."""

import json
from collections import Counter
from pathlib import Path


def repeated_labels(labels) -> list[str]:
    """The class names given more than once: `label2id` keeps one index per name, so the head would lose classes."""
    return sorted(label for label, count in Counter(labels).items() if count > 1)


def read_class_names(path: str | Path) -> list[str]:
    """
    Class names in label order from a file: a JSON list of names, a JSON object mapping each name to its label (or
    each label to its name) for labels 0 to n - 1, or text with one name per line. A `ValueError` names the file and
    what is wrong.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first name
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else f"not UTF-8 text: {error.reason}"
        raise ValueError(f"{path}: cannot read the class names ({reason or error}).") from None
    if text.lstrip().startswith(("[", "{")):
        try:
            names = json.loads(text)
        except ValueError as error:  # JSON with a mistake, not names one per line
            raise ValueError(
                f"{path}: the class names are not valid JSON ({error}); a file starting with '[' or '{{' is read as "
                "JSON (names one per line must not start so)."
            ) from None
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]  # one name per line
    if isinstance(names, dict):
        items = list(names.items())
        if all(isinstance(label, int) and not isinstance(label, bool) for _, label in items):  # name -> label
            by_label = {label: name for name, label in items}
        elif all(key.isascii() and key.isdecimal() and isinstance(name, str) for key, name in items):  # label -> name
            by_label = {int(key): name for key, name in items}
        else:
            raise ValueError(
                f"{path}: a JSON object of class names maps each name to its integer label, or each label to its name."
            )
        if sorted(by_label) != list(range(len(items))):
            raise ValueError(f"{path}: the labels of the class names must be 0 to {len(items) - 1}, each once.")
        names = [by_label[label] for label in range(len(by_label))]
    if not isinstance(names, list) or not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"{path}: expected class names: a JSON list of strings, a JSON object, or one name per line.")
    if repeated := repeated_labels(names):
        raise ValueError(f"{path}: class names given more than once: {repeated[:5]}.")
    return names
