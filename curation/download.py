"""Resumable, verified, atomic downloads and safe archive extraction.

A download writes to ``<dest>.part``; an interrupted transfer resumes from the partial bytes with an HTTP
``Range`` request; the finished file is verified (md5 / sha256 where published, size otherwise) and only then
renamed to ``<dest>``. So ``<dest>`` existing means "complete and verified", and a killed download is simply
re-run. ``file://`` URLs and plain local paths go through the same verification (used by the offline demo).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import requests
from tqdm.auto import tqdm

CHUNK_BYTES = 1 << 20
#: Network read size: small, so that a dropped connection loses at most this much of what arrived.
STREAM_BYTES = 1 << 16
USER_AGENT = "txfm-diverserna-curation/0.1 (+https://github.com/)"


class DownloadError(RuntimeError):
    """A download failed; the message is one line naming the URL."""


@dataclass(frozen=True)
class Expected:
    """What a finished file must match. Any field left as None is not checked."""

    size: int | None = None
    md5: str | None = None
    sha256: str | None = None

    @classmethod
    def from_spec(cls, spec: dict | None) -> "Expected":
        spec = spec or {}
        size = spec.get("size", spec.get("bytes"))
        return cls(size=int(size) if size is not None else None, md5=spec.get("md5"), sha256=spec.get("sha256"))


def _hashers(expected: Expected) -> dict[str, "hashlib._Hash"]:
    out = {}
    if expected.md5:
        out["md5"] = hashlib.md5()
    if expected.sha256:
        out["sha256"] = hashlib.sha256()
    return out


def verify_file(path: Path, expected: Expected, url: str) -> None:
    """Raise DownloadError (naming ``url``) if ``path`` does not match ``expected``."""
    size = path.stat().st_size
    if expected.size is not None and size != expected.size:
        raise DownloadError(f"{url}: size mismatch: expected {expected.size} bytes, got {size}")
    hashers = _hashers(expected)
    if hashers:
        with open(path, "rb") as fh:
            while block := fh.read(CHUNK_BYTES):
                for h in hashers.values():
                    h.update(block)
        for name, h in hashers.items():
            want = getattr(expected, name).lower()
            if h.hexdigest() != want:
                raise DownloadError(f"{url}: {name} mismatch: expected {want}, got {h.hexdigest()}")


def download(url: str, dest: str | os.PathLike, expected: Expected | dict | None = None, *, retries: int = 5,
             backoff_s: float = 2.0, timeout_s: float = 60.0, progress: bool = True,
             session: requests.Session | None = None) -> Path:
    """Fetch ``url`` to ``dest`` (resumable, retried, verified, atomic). Returns ``dest``.

    Re-running after success is a no-op when ``dest`` exists and matches ``expected``'s size (hashes are
    checked once, at download time). Raises DownloadError with a one-line message naming the URL.
    """
    dest = Path(dest)
    expected = expected if isinstance(expected, Expected) else Expected.from_spec(expected)
    if dest.exists() and (expected.size is None or dest.stat().st_size == expected.size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        _copy_local(Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(url), part, url, progress)
    elif parsed.scheme in ("http", "https"):
        _fetch_http(url, part, expected, retries, backoff_s, timeout_s, progress, session or requests.Session())
    else:
        raise DownloadError(f"{url}: unsupported URL scheme {parsed.scheme!r}")
    try:
        verify_file(part, expected, url)
    except DownloadError:
        part.unlink(missing_ok=True)  # a corrupt partial must not be resumed
        raise
    os.replace(part, dest)
    return dest


def _copy_local(src: Path, part: Path, url: str, progress: bool) -> None:
    if not src.is_file():
        raise DownloadError(f"{url}: no such file")
    with open(src, "rb") as fin, open(part, "wb") as fout, tqdm(
            total=src.stat().st_size, unit="B", unit_scale=True, desc=src.name, disable=not progress,
            leave=False) as bar:
        while block := fin.read(CHUNK_BYTES):
            fout.write(block)
            bar.update(len(block))


def _fetch_http(url: str, part: Path, expected: Expected, retries: int, backoff_s: float, timeout_s: float,
                progress: bool, session: requests.Session) -> None:
    last_error = "no attempt made"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        have = part.stat().st_size if part.exists() else 0
        if expected.size is not None and have == expected.size:
            return
        headers = {"User-Agent": USER_AGENT}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with session.get(url, headers=headers, stream=True, timeout=timeout_s) as resp:
                if resp.status_code == 416 and have:  # we already hold every byte
                    return
                if resp.status_code in (404, 401, 403, 410):
                    raise DownloadError(f"{url}: HTTP {resp.status_code} {resp.reason}")
                resp.raise_for_status()
                if resp.status_code not in (200, 206):  # e.g. figshare+ "202 Accepted" while it prepares a file
                    raise DownloadError(f"{url}: HTTP {resp.status_code} {resp.reason} is not a file download "
                                        "(for figshare+ use the ndownloader file URL)")
                resumed = resp.status_code == 206
                if have and not resumed:
                    have = 0  # server ignored Range: start over
                total = _total_bytes(resp, have) or expected.size
                with open(part, "ab" if resumed else "wb") as fh, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True, disable=not progress, leave=False,
                        desc=Path(urlparse(url).path).name or url) as bar:
                    for block in resp.iter_content(STREAM_BYTES):
                        fh.write(block)
                        bar.update(len(block))
                got = part.stat().st_size
                if got == 0:
                    raise DownloadError(f"{url}: HTTP {resp.status_code} with an empty body; nothing was downloaded")
                if total is not None and got < total:
                    raise requests.exceptions.ChunkedEncodingError(f"connection closed at {got} of {total} bytes")
                return
        except DownloadError:
            raise
        except requests.exceptions.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            last_error = f"HTTP {status}"
            if status is not None and status < 500 and status != 429:
                raise DownloadError(f"{url}: {last_error}") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                requests.exceptions.ChunkedEncodingError) as exc:
            last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    raise DownloadError(f"{url}: failed after {retries + 1} attempts ({last_error}); partial bytes kept in {part}")


def _total_bytes(resp: requests.Response, have: int) -> int | None:
    if resp.status_code == 206:
        rng = resp.headers.get("Content-Range", "")  # "bytes 100-999/1000"
        if "/" in rng and not rng.endswith("*"):
            return int(rng.rsplit("/", 1)[1])
    length = resp.headers.get("Content-Length")
    if length is None:
        return None
    return int(length) + (have if resp.status_code == 206 else 0)


def _check_member(name: str, archive: Path) -> PurePosixPath:
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith(("/", "\\")) or ".." in p.parts or (len(name) > 1 and name[1] == ":"):
        raise DownloadError(f"{archive}: refusing unsafe archive member {name!r}")
    return p


def extract_archive(archive: str | os.PathLike, dest_dir: str | os.PathLike, members: list[str] | None = None) -> Path:
    """Extract a zip or tar(.gz) archive into ``dest_dir`` atomically; refuses absolute paths and ``..``.

    ``members`` restricts extraction to those names. The archive is unpacked into a hidden temp directory
    that is renamed onto ``dest_dir`` at the end, so ``dest_dir`` existing means the extraction finished.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    if dest_dir.exists():
        return dest_dir
    tmp = dest_dir.with_name(f".{dest_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                names = [i.filename for i in zf.infolist()]
                for name in names:
                    _check_member(name, archive)
                zf.extractall(tmp, members=members or names)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                chosen = [m for m in tf.getmembers() if members is None or m.name in members]
                for m in chosen:
                    _check_member(m.name, archive)
                    if m.issym() or m.islnk():
                        _check_member(m.linkname, archive)
                tf.extractall(tmp, members=chosen, filter="data")
        else:
            raise DownloadError(f"{archive}: not a zip or tar archive")
        os.replace(tmp, dest_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest_dir
