"""Small helpers shared by the curation steps: one-line errors, atomic writes, checksums, duplicate-ID checks."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd


def one_line(text: object) -> str:
    """``str(text)`` with every run of whitespace (newlines included) folded to one space."""
    return " ".join(str(text).split())


class CurationError(ValueError):
    """Bad input. ``str(err)`` is one line: ``<file>: <what is wrong>``."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write to; on success rename it onto ``final``.

    On any exception the temporary file (or directory) is removed, so ``final`` is either absent or
    complete — never half-written. The temp name starts with ``.`` so globs such as ``part-*.parquet``
    never see it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk_bytes: int = 1 << 20) -> str:
    """Hex digest of a file, read in bounded chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


class SeenIds:
    """Rejects a repeated source ID across chunks, keeping one 8-byte hash per sample (not the strings)."""

    def __init__(self, where: str | os.PathLike | None):
        self.where = where
        self.hashes = np.empty(0, dtype=np.uint64)  # sorted
        self.first: str | None = None

    def add(self, source_ids: pd.Series) -> None:
        if self.first is None and len(source_ids):
            self.first = str(source_ids.iloc[0])
        repeated = source_ids[source_ids.duplicated()]
        hashes = pd.util.hash_pandas_object(source_ids, index=False).to_numpy(np.uint64)
        pos = np.minimum(np.searchsorted(self.hashes, hashes), max(len(self.hashes) - 1, 0))
        seen_before = (self.hashes[pos] == hashes) if len(self.hashes) else np.zeros(len(hashes), dtype=bool)
        if len(repeated) or seen_before.any():
            duplicate = repeated.iloc[0] if len(repeated) else source_ids[seen_before].iloc[0]
            raise CurationError(self.where, f"duplicate sample ID {duplicate!r}")
        self.hashes = np.sort(np.concatenate([self.hashes, hashes]))


def limit_heap_fragmentation(mmap_threshold_bytes: int = 1 << 16) -> bool:
    """Serve allocations above ``mmap_threshold_bytes`` with mmap (glibc ``mallopt(M_MMAP_THRESHOLD)``).

    Streaming allocates and frees many chunk-sized arrays. glibc raises its mmap threshold dynamically after
    such frees, so later chunk arrays come from the brk heap, which fragments: peak RSS then grows with the
    number of chunks (measured +37 % from 50k to 500k cells) although live memory is flat. A fixed threshold
    returns every chunk's memory to the OS on free. Returns False where glibc is not available (no-op).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_mmap_threshold = -3  # from <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, int(mmap_threshold_bytes)))
    except (OSError, AttributeError):
        return False
