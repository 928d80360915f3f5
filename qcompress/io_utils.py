"""Small file helpers: atomic writes, hashing, labels files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from qcompress.errors import QCompressError


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise QCompressError(f"{what} not found: {path}", "check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QCompressError(f"{what} is not valid JSON: {path}: {exc}", "fix or regenerate the file") from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


BACKGROUND = "BACKGROUND"


def read_labels(path: Path) -> tuple[str, ...]:
    """Class names, one per line; BACKGROUND is put first when the file does not start with it."""
    path = Path(path)
    if not path.is_file():
        raise QCompressError(f"labels file not found: {path}", "pass --labels with one class name per line")
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise QCompressError(f"labels file is not UTF-8 text: {path}", "one class name per line") from None
    if not names:
        raise QCompressError(f"labels file is empty: {path}", "one class name per line")
    if names[0].upper() != BACKGROUND:
        names.insert(0, BACKGROUND)
    return tuple(names)


def write_labels(path: Path, class_names: Sequence[str]) -> None:
    write_text_atomic(path, "\n".join(class_names) + "\n")
