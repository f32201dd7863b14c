"""Downloads against a loopback HTTP server: resume after a dropped connection, checksums, 404, archives."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from curation.download import DownloadError, Expected, download, extract_archive

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, not compressible by accident


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /data.bin with Range support; /flaky.bin drops the first connection halfway."""

    drops_left = 0
    requests_seen: list[dict] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):  # noqa: N802 (http.server API)
        type(self).requests_seen.append({"path": self.path, "range": self.headers.get("Range")})
        if self.path in ("/accepted.bin", "/empty.bin"):  # figshare+ landing links: 202 (or 200) and no body
            self.send_response(202 if self.path == "/accepted.bin" else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path not in ("/data.bin", "/flaky.bin"):
            self.send_error(404, "Not Found")
            return
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path == "/flaky.bin" and type(self).drops_left > 0:
            type(self).drops_left -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # drop mid-file
            return
        self.wfile.write(body)


@pytest.fixture()
def server():
    _Handler.requests_seen = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_sha256(server, tmp_path):
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    out = download(f"{server}/data.bin", tmp_path / "d.bin", {"sha256": sha, "size": len(PAYLOAD)}, progress=False)
    assert out.read_bytes() == PAYLOAD
    # second call is a no-op (no request made)
    n = len(_Handler.requests_seen)
    download(f"{server}/data.bin", tmp_path / "d.bin", {"sha256": sha, "size": len(PAYLOAD)}, progress=False)
    assert len(_Handler.requests_seen) == n


def test_dropped_connection_resumes_from_partial_bytes(server, tmp_path):
    _Handler.drops_left = 1
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    out = download(f"{server}/flaky.bin", tmp_path / "f.bin", {"md5": md5}, backoff_s=0.01, progress=False)
    assert out.read_bytes() == PAYLOAD
    ranges = [r["range"] for r in _Handler.requests_seen if r["path"] == "/flaky.bin"]
    assert ranges[0] is None
    assert ranges[1] is not None, "the retry must ask for the remaining bytes only"
    start = int(ranges[1].split("=")[1].rstrip("-"))
    assert 0 < start <= len(PAYLOAD) // 2  # resumed from the partial bytes, not from zero


def test_checksum_mismatch_fails_and_leaves_nothing_complete(server, tmp_path):
    dest = tmp_path / "bad.bin"
    with pytest.raises(DownloadError, match=r"data\.bin: sha256 mismatch"):
        download(f"{server}/data.bin", dest, {"sha256": "0" * 64}, progress=False)
    assert not dest.exists()
    assert not dest.with_name("bad.bin.part").exists()


def test_404_names_the_url(server, tmp_path):
    with pytest.raises(DownloadError) as err:
        download(f"{server}/missing.h5ad", tmp_path / "m", progress=False)
    assert f"{server}/missing.h5ad" in str(err.value) and "404" in str(err.value)
    assert "\n" not in str(err.value)


def test_file_url_and_size_check(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    out = download(src.as_uri(), tmp_path / "copy.bin", Expected(size=len(PAYLOAD)), progress=False)
    assert out.read_bytes() == PAYLOAD
    with pytest.raises(DownloadError, match="size mismatch"):
        download(src.as_uri(), tmp_path / "copy2.bin", Expected(size=5), progress=False)


def test_extract_refuses_traversal(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("ok/matrix.mtx", "x")
        zf.writestr("../escape.txt", "x")
    with pytest.raises(DownloadError, match="unsafe archive member"):
        extract_archive(evil, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape.txt").exists()

    tgz = tmp_path / "evil.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        info = tarfile.TarInfo("/etc/passwd-copy")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DownloadError, match="unsafe archive member"):
        extract_archive(tgz, tmp_path / "out2")


def test_extract_tar_ok(tmp_path):
    tgz = tmp_path / "good.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        info = tarfile.TarInfo("data/genes.tsv")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    out = extract_archive(tgz, tmp_path / "x")
    assert (out / "data" / "genes.tsv").read_bytes() == b"abc"
    assert extract_archive(tgz, tmp_path / "x") == out  # idempotent


@pytest.mark.parametrize("path,fragment", [("/accepted.bin", "HTTP 202"), ("/empty.bin", "empty body")])
def test_2xx_with_an_empty_body_is_an_error_not_a_file(server, tmp_path, path, fragment):
    """figshare+ article links answer 202 Accepted with no body; that used to be saved as a 0-byte 'download'."""
    dest = tmp_path / "x.h5ad"
    with pytest.raises(DownloadError) as err:
        download(f"{server}{path}", dest, progress=False, backoff_s=0.01, retries=1)
    assert fragment in str(err.value) and f"{server}{path}" in str(err.value) and "\n" not in str(err.value)
    assert not dest.exists()


def test_short_body_against_the_expected_size_is_an_error(server, tmp_path):
    dest = tmp_path / "short.bin"
    with pytest.raises(DownloadError, match="size mismatch|failed after"):
        download(f"{server}/data.bin", dest, {"size": len(PAYLOAD) + 10}, progress=False, backoff_s=0.01, retries=1)
    assert not dest.exists()
