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
"""The files the command-line tools and figure helpers write: checked before any work, so a long run never ends in a
traceback about its output path."""

import argparse
import os
import shutil
from pathlib import Path


def figure_format(path: str | os.PathLike) -> str:
    """The format matplotlib writes `path` in, from its suffix; a `ValueError` naming the path for a suffix it does not
    write, or none (matplotlib would add ".png", and the file written would not be the one named)."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in formats:
        found = f"'.{suffix}'" if suffix else "no suffix"
        raise ValueError(f"{path}: a figure is written as {', '.join(f'.{name}' for name in sorted(formats))}; got {found}.")
    if suffix == "pgf":
        # matplotlib writes PGF through a TeX system: without it the save would fail only after the work.
        from matplotlib import rcParams

        tex_system = rcParams["pgf.texsystem"]
        if shutil.which(tex_system) is None:
            raise ValueError(f"{path}: .pgf is written by {tex_system}, which is not found on PATH; use .pdf or .svg.")
    return suffix


def check_output_path(parser: argparse.ArgumentParser, option: str, path: str | None, figure: bool = False) -> None:
    """Stop the command (`parser.error`, one line) unless `path` can be written: its folder exists and may be written
    to (the file too, if it exists) and, for a figure, its suffix is a format matplotlib writes."""
    if path is None:
        return
    folder = Path(path).parent
    if not folder.is_dir():
        parser.error(f"{option} {path}: the folder {folder} does not exist.")
    if Path(path).is_dir():
        parser.error(f"{option} {path}: is a folder, not a file.")
    # Found out at the end, a long timeline's windows would be lost.
    if not os.access(folder, os.W_OK | os.X_OK) or (Path(path).exists() and not os.access(path, os.W_OK)):
        parser.error(f"{option} {path}: no permission to write it.")
    if figure:
        try:
            figure_format(path)
        except ValueError as error:
            parser.error(f"{option} {error}")


def check_output_dir(parser: argparse.ArgumentParser, option: str, path: str) -> None:
    """Stop the command (`parser.error`, one line) unless `path` is a folder or can be made one: `save_pretrained`
    creates the missing folders, but none of them may be a file."""
    existing = next(folder for folder in (Path(path), *Path(path).parents) if folder.exists())
    if not existing.is_dir():
        parser.error(f"{option} {path}: {existing} is a file, not a folder.")
