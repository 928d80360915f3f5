"""Small file helpers: atomic writes, hashing, labels files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
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


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) as None: bare ``NaN`` is not JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """Strict JSON (NaN and inf written as null), atomically."""
    text = json.dumps(json_safe(data), indent=2, sort_keys=False, default=str, allow_nan=False)
    write_text_atomic(path, text + "\n")


def check_writable(path: Path, option: str, *, is_dir: bool = False) -> None:
    """Fail now, before any work, if ``path`` (a file to write, or a folder with ``is_dir``) cannot be
    written. The folder is really tried (``os.access`` says yes to root everywhere, /proc included):
    missing folders are created, probed with a temporary file and removed again."""
    path = Path(path)
    if path.exists() and path.is_dir() != is_dir:
        kind = "a folder" if path.is_dir() else "a file"
        raise QCompressError(f"{option} {path} is {kind}", f"pass {'a folder' if is_dir else 'a file path'}")
    folder = path if is_dir else path.parent
    created = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent
    try:
        for missing in reversed(created):
            missing.mkdir()
        fd, tmp = tempfile.mkstemp(prefix=".qcompress-probe-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise QCompressError(f"cannot write {option} {path}: {exc.strerror or exc}", f"choose another {option}") from None
    finally:
        for made in created:  # deepest first
            with contextlib.suppress(OSError):
                made.rmdir()


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


def versions() -> dict[str, str]:
    """Library versions and machine, recorded in every report and sidecar."""
    import platform
    import sys

    import numpy
    import torch
    import torchvision

    from qcompress import __version__

    return {
        "qcompress": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
        "machine": f"{platform.system()} {platform.machine()}",
    }
