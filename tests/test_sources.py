"""Source manifest and resolvers (curation.sources), against a loopback HTTP server serving canned API answers."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from curation.config import load_config
from curation.download import DownloadError
from curation.io import CurationError
from curation.sources import (curation_entry, fetch_source, geo_suppl_url, list_index, load_manifest, main, resolve,
                              write_sra_metadata)

PAYLOADS = {f"/files/{name}": (name * 100).encode() for name in ("a.h5ad", "b.zip", "c.zip", "d.zip")}


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _tar_bytes() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in (("Wu/count_matrix_genes.tsv", b"G1\n"), ("Wu/metadata.csv", b",x\nc1,1\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Api(BaseHTTPRequestHandler):
    """Canned figshare / CELLxGENE / GDC / GEO answers; ``base`` is set to the server's URL."""

    base = ""
    posts: list[dict] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, body: bytes, content_type: str = "application/json", status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj) -> None:
        self._send(json.dumps(obj).encode())

    def do_GET(self):  # noqa: N802
        path, _, query = self.path.partition("?")
        b = self.base
        if path == "/figshare/articles/77":
            return self._json({"id": 77, "version": 3, "title": "MIX-seq", "doi": "10.0/x", "license": {"name": "CC BY 4.0"}})
        if path == "/figshare/articles/77/files":
            files = [{"id": i, "name": n, "size": len(PAYLOADS[f"/files/{n}"]), "computed_md5": _md5(PAYLOADS[f"/files/{n}"]),
                      "download_url": f"{b}/files/{n}"} for i, n in enumerate(["a.h5ad", "b.zip", "c.zip", "d.zip"])]
            params = dict(p.split("=") for p in query.split("&"))
            page, size = int(params["page"]), int(params["page_size"])
            return self._json(files[(page - 1) * size: page * size])
        if path == "/cxg/collections/coll-1":
            ds = [{"dataset_id": "ds-core", "dataset_version_id": "v-core-2", "title": "GBmap core", "cell_count": 5,
                   "assets": [{"filetype": "RDS", "url": f"{b}/files/x.rds", "filesize": 1},
                              {"filetype": "H5AD", "url": f"{b}/files/a.h5ad", "filesize": len(PAYLOADS["/files/a.h5ad"])}]},
                  {"dataset_id": "ds-ext", "dataset_version_id": "v-ext-1", "title": "GBmap extended", "cell_count": 9,
                   "assets": []}]
            return self._json({"collection_id": "coll-1", "collection_version_id": "cv-7", "name": "GBmap", "datasets": ds})
        if path == "/geo/series/GSE176nnn/GSE176078/suppl/":
            html = ('<html><body><a href="../">Parent</a><a href="?C=M;O=A">sort</a>'
                    '<a href="GSE176078_Wu.tar.gz">GSE176078_Wu.tar.gz</a> 3.1G</body></html>')
            return self._send(html.encode(), "text/html")
        if path == "/geo/series/GSE176nnn/GSE176078/suppl/GSE176078_Wu.tar.gz":
            return self._send(_tar_bytes(), "application/gzip")
        if path.startswith("/gdc/data/"):
            uuid = path.rsplit("/", 1)[1]
            return self._send(f"gene_id\tunstranded\n{uuid}\n".encode(), "text/plain")
        if path in PAYLOADS:
            return self._send(PAYLOADS[path], "application/octet-stream")
        if path == "/mirror/":
            return self._send(b'<a href="../">up</a><a href="one.txt">one</a><a href="sub/">sub</a>', "text/html")
        if path == "/mirror/sub/":
            return self._send(b'<a href="two.txt">two</a><a href="http://elsewhere/x">x</a>', "text/html")
        if path in ("/mirror/one.txt", "/mirror/sub/two.txt"):
            return self._send(path.encode(), "text/plain")
        self._send(b"not found", "text/plain", 404)

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).posts.append(body)
        if self.path != "/gdc/files":
            return self._send(b"no", "text/plain", 404)
        hits = [{"file_id": f"uuid-{i}", "file_name": f"uuid-{i}.rna_seq.augmented_star_gene_counts.tsv",
                 "md5sum": _md5(f"gene_id\tunstranded\nuuid-{i}\n".encode()),
                 "file_size": len(f"gene_id\tunstranded\nuuid-{i}\n".encode()),
                 "cases": [{"submitter_id": f"TCGA-0{i}", "project": {"project_id": "TCGA-BRCA", "primary_site": "Breast"},
                            "samples": [{"submitter_id": f"TCGA-0{i}-01A", "sample_type": "Primary Tumor"}]}]}
                for i in range(3)]
        start, size = body["from"], body["size"]
        self._json({"data": {"hits": hits[start:start + size], "pagination": {"total": 3, "from": start, "size": size}}})


@pytest.fixture(scope="module")
def api():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    _Api.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield _Api.base
    httpd.shutdown()
    httpd.server_close()


# ------------------------------------------------------------------------------------------------ figshare


def test_figshare_pages_through_files_and_selects_by_name(api):
    res = resolve({"kind": "figshare", "api_url": f"{api}/figshare", "article_id": 77, "page_size": 3,
                   "files": ["d.zip", "a.h5ad"]})
    assert [f.name for f in res.files] == ["d.zip", "a.h5ad"]  # d.zip is on page 2
    assert res.files[1].md5 == _md5(PAYLOADS["/files/a.h5ad"]) and res.files[1].size == 600
    assert res.record["version"] == 3 and res.record["file_ids"] == {"d.zip": 3, "a.h5ad": 0}


def test_figshare_include_glob_and_missing_name(api):
    res = resolve({"kind": "figshare", "api_url": f"{api}/figshare", "article_id": 77, "include": ["*.zip"]})
    assert [f.name for f in res.files] == ["b.zip", "c.zip", "d.zip"]
    with pytest.raises(CurationError, match=r"no file\(s\) nope\.h5ad in the article"):
        resolve({"kind": "figshare", "api_url": f"{api}/figshare", "article_id": 77, "files": ["nope.h5ad"]})


def test_manifest_checksum_disagreeing_with_upstream_fails(api):
    with pytest.raises(CurationError, match="size published upstream .600. differs from the manifest .5."):
        resolve({"kind": "figshare", "api_url": f"{api}/figshare", "article_id": 77, "files": ["a.h5ad"],
                 "expected": {"a.h5ad": {"size": 5}}})


def test_fetch_source_downloads_verifies_and_records(api, tmp_path):
    spec = {"kind": "figshare", "api_url": f"{api}/figshare", "article_id": 77, "include": ["b.zip", "c.zip"]}
    record = fetch_source("mixseq", spec, tmp_path / "mixseq", progress=False)
    assert (tmp_path / "mixseq" / "b.zip").read_bytes() == PAYLOADS["/files/b.zip"]
    on_disk = json.loads((tmp_path / "mixseq" / "download.json").read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert {f["name"]: f["md5"] for f in on_disk["files"]} == {n: _md5(PAYLOADS[f"/files/{n}"]) for n in ("b.zip", "c.zip")}


# ------------------------------------------------------------------------------------------------ CELLxGENE


def test_cellxgene_by_dataset_id_records_the_version(api):
    res = resolve({"kind": "cellxgene", "api_url": f"{api}/cxg", "collection_id": "coll-1", "dataset_id": "ds-core",
                   "name": "gbmap.h5ad"})
    (f,) = res.files
    assert (f.name, f.url, f.size) == ("gbmap.h5ad", f"{api}/files/a.h5ad", 600)
    assert res.record["dataset_version_id"] == "v-core-2" and res.record["collection_version_id"] == "cv-7"


def test_cellxgene_pinned_version_and_cell_count(api):
    spec = {"kind": "cellxgene", "api_url": f"{api}/cxg", "collection_id": "coll-1", "name": "x.h5ad"}
    res = resolve({**spec, "dataset_version_id": "v-core-2", "cell_count": 5})
    assert res.record["dataset_id"] == "ds-core"
    with pytest.raises(CurationError, match=r"0 datasets match dataset_version_id v-core-1 \(pinned"):
        resolve({**spec, "dataset_version_id": "v-core-1"})  # superseded version: fail, never fetch another
    with pytest.raises(CurationError, match="has 5 cells, the manifest expects 6"):
        resolve({**spec, "dataset_version_id": "v-core-2", "cell_count": 6})


def test_cellxgene_title_must_match_exactly_one_dataset(api):
    spec = {"kind": "cellxgene", "api_url": f"{api}/cxg", "collection_id": "coll-1", "name": "x.h5ad"}
    assert resolve({**spec, "title": "core"}).record["dataset_id"] == "ds-core"
    with pytest.raises(CurationError, match="2 datasets match title containing 'gbmap'"):
        resolve({**spec, "title": "gbmap"})
    with pytest.raises(CurationError, match="has no H5AD asset"):
        resolve({**spec, "title": "extended"})


# ------------------------------------------------------------------------------------------------ GDC


def test_gdc_pages_downloads_by_uuid_and_writes_sample_sheet(api, tmp_path):
    filters = {"op": "in", "content": {"field": "files.access", "value": ["open"]}}
    _Api.posts.clear()
    spec = {"kind": "gdc", "api_url": f"{api}/gdc", "filters": filters, "page_size": 2}
    record = fetch_source("tcga", spec, tmp_path / "tcga", progress=False)
    assert [p["from"] for p in _Api.posts] == [0, 2] and all(p["filters"] == filters for p in _Api.posts)
    assert "cases.samples.submitter_id" in _Api.posts[0]["fields"].split(",")
    files = sorted((tmp_path / "tcga" / "star_counts").iterdir())
    assert [f.name for f in files] == [f"uuid-{i}.rna_seq.augmented_star_gene_counts.tsv" for i in range(3)]
    sheet = pd.read_csv(tmp_path / "tcga" / "sample_sheet.tsv", sep="\t")
    assert sheet["sample_id"].tolist() == ["TCGA-00-01A", "TCGA-01-01A", "TCGA-02-01A"]
    assert set(sheet["project"]) == {"TCGA-BRCA"} and set(sheet["tissue"]) == {"Breast"}
    assert record["sample_sheet"] == "sample_sheet.tsv" and record["resolved"]["n_files"] == 3


def test_gdc_md5_mismatch_fails(api, tmp_path):
    spec = {"kind": "gdc", "api_url": f"{api}/gdc", "filters": {"op": "and", "content": []}, "max_files": 1,
            "expected": {"uuid-0.rna_seq.augmented_star_gene_counts.tsv": {}}}
    res = resolve(spec)
    assert len(res.files) == 1
    bad = {**spec, "kind": "urls", "files": [{"url": res.files[0].url, "name": "x.tsv", "md5": "0" * 32}]}
    bad.pop("filters")
    with pytest.raises(DownloadError, match="md5 mismatch"):
        fetch_source("tcga", bad, tmp_path / "t", progress=False)
    assert not (tmp_path / "t" / "download.json").exists()


# ------------------------------------------------------------------------------------------------ GEO, mirror


def test_geo_suppl_url_layout():
    assert geo_suppl_url("GSE176078") == "https://ftp.ncbi.nlm.nih.gov/geo/series/GSE176nnn/GSE176078/suppl/"
    assert geo_suppl_url("GSM4150378").endswith("/geo/samples/GSM4150nnn/GSM4150378/suppl/")
    assert geo_suppl_url("GSE12", "http://x").startswith("http://x/series/GSEnnn/GSE12/")


def test_geo_fetch_checks_listing_and_extracts(api, tmp_path):
    spec = {"kind": "geo", "base_url": f"{api}/geo", "accession": "GSE176078", "files": ["GSE176078_Wu.tar.gz"],
            "extract": [{"archive": "GSE176078_Wu.tar.gz", "into": "extracted"}], "sra_metadata": False}
    record = fetch_source("wu", spec, tmp_path / "wu", progress=False)
    assert (tmp_path / "wu" / "extracted" / "Wu" / "metadata.csv").read_text() == ",x\nc1,1\n"
    assert record["extracted"] == [{"archive": "GSE176078_Wu.tar.gz", "into": "extracted"}]
    with pytest.raises(CurationError, match=r"no file\(s\) missing\.gz \(listed: GSE176078_Wu\.tar\.gz\)"):
        resolve({**spec, "files": ["missing.gz"]})


def test_mirror_lists_file_and_http_directories(api, tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "x.zip").write_bytes(b"x")
    (src / "top.txt").write_bytes(b"t")
    (src / ".hidden").write_bytes(b"h")
    assert [n for n, _ in list_index(src.as_uri())] == ["d/x.zip", "top.txt"]
    res = resolve({"kind": "mirror", "url": src.as_uri(), "include": ["*.zip"]})
    assert [f.name for f in res.files] == ["d/x.zip"]
    assert list_index(f"{api}/mirror") == [("one.txt", f"{api}/mirror/one.txt"), ("sub/two.txt", f"{api}/mirror/sub/two.txt")]


def test_sra_metadata_without_pysradb_is_a_clear_skip(tmp_path):
    if importlib.util.find_spec("pysradb") is not None:
        pytest.skip("pysradb installed")
    reason = write_sra_metadata("GSE176078", tmp_path / "sra.tsv")
    assert reason.startswith("skipped: pysradb is not installed") and not (tmp_path / "sra.tsv").exists()


def test_unsafe_destination_names_are_refused(tmp_path):
    with pytest.raises(CurationError, match="unsafe destination"):
        resolve({"kind": "urls", "files": [{"url": "file:///etc/hosts", "name": "../escape"}]})


# ------------------------------------------------------------------------------------------------ manifest, CLI


def test_real_manifest_has_nine_valid_sources_and_three_screens():
    manifest = load_manifest()
    sources = manifest["sources"]
    assert len(sources) == 9 and len(manifest["evaluation_screens"]) == 3
    datasets = {name: curation_entry(name, entry) for name, entry in sources.items()}
    config = load_config({"raw_dir": "/raw", "datasets": datasets})  # raises on any invalid curation entry
    assert config["datasets"]["gtex"]["files"]["matrix"].startswith("/raw/gtex/")
    assert config["datasets"]["tcga"]["reader"]["sample_sheet"] == "/raw/tcga/sample_sheet.tsv"
    assert [n for n, e in sources.items() if e.get("phenoprint", {}).get("enabled")] == ["replogle_k562_gwps"]
    for name, entry in sources.items():
        assert entry["paper"]["samples"] > 0 and entry["paper"]["genes"] > 0, name
        assert entry["facts"] and all(isinstance(f["verified"], bool) and f["note"] for f in entry["facts"]), name
    assert sum(e["paper"]["samples"] for e in sources.values()) == 1_434_299  # "DiverseRNA-1.4M"


def test_bad_manifest_entry_is_one_line(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text("sources:\n  x:\n    fetch: {kind: cellxgene, collection_id: c, name: n.h5ad}\n")
    with pytest.raises(CurationError) as err:
        load_manifest(bad)
    assert "sources.x.fetch" in str(err.value) and "\n" not in str(err.value)


def test_cli_reports_bad_spec_in_one_line(capsys, tmp_path):
    assert main(["fetch", "--name", "x", "--spec", "{not json", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --spec is not JSON") and err.count("\n") == 1
    assert main(["--quiet", "fetch", "--name", "x", "--spec", '{"kind": "ftp"}', "--out", str(tmp_path)]) == 2
