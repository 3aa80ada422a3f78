"""Run bookkeeping: the machinery that keeps long runs safe. You can skip this file.

The method lives in rewards.py -> data.py -> model.py -> train.py -> eval.py. This module holds what
every long run needs and no reader of the method does: run directories and their metadata.json,
lineage, resume, Ctrl-C, metrics files, child processes and the phase rules.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path, obj) -> None:
    """Write JSON atomically (a temporary file, then a rename): a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_metadata(run_dir) -> dict | None:
    """RUN_DIR/metadata.json as a dict, or None when there is no run there."""
    try:
        return json.loads((Path(run_dir) / "metadata.json").read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
