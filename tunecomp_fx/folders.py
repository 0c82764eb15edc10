"""Output folders are checked before the slow work that fills them starts (an export, a training
run), so that a folder that cannot be written fails at once, with the caller's kind of error."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tunecomp_fx.errors import TunecompError


def check_writable_folder(folder: Path, what: str, error: type[TunecompError]) -> None:
    """Create `folder` (and its parents) and write a temporary file in it; on failure raise `error`
    saying that `what` (e.g. "the ONNX file out/model.onnx") cannot be written, why, and what to do."""
    existing = next(parent for parent in (folder, *folder.absolute().parents) if parent.exists())
    if not existing.is_dir():
        raise error(
            f"cannot write {what}: {existing} is a file, not a folder, so the output folder is not writable. "
            "Choose an output folder you can write to"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as failure:
        raise error(
            f"cannot write {what}: the folder {folder} is not writable "
            f"({type(failure).__name__}: {failure.strerror or failure}). Choose an output folder you can write to"
        ) from failure
