"""Where the raw data of each DiverseRNA source comes from: the source manifest, resolvers and ``fetch``.

A *fetch spec* (the ``fetch:`` block of a source in ``resources/datasets.yaml``) says how to obtain a source's
raw files. Its ``kind`` picks a resolver that turns it into a list of :class:`RemoteFile` (URL, destination
name, expected size / md5 / sha256) plus a provenance record (resolved dataset versions, article versions…):

* ``urls`` — a literal list ``files: [{url, name?, size?, md5?, sha256?}]``;
* ``mirror`` — every file under a ``file://`` directory or an HTTP(S) directory index (``include`` globs);
  the offline demo serves its simulated sources this way;
* ``figshare`` — ``article_id`` (+ ``files`` names or ``include`` globs) through the figshare v2 API, which
  publishes each file's size and md5;
* ``cellxgene`` — ``collection_id`` + ``dataset_id`` (or ``title`` substring) through the CELLxGENE
  curation API; the resolved ``dataset_version_id`` is recorded;
* ``gdc`` — ``filters`` through the GDC ``/files`` endpoint (paged); each file is downloaded by UUID from
  ``/data/<uuid>`` with its md5 checked, and a sample sheet (file_name, sample_id, case_id, project, tissue)
  is written for the ``star_counts`` reader;
* ``geo`` — ``accession`` (GSE… or GSM…) + ``files``: supplementary files under the NCBI GEO HTTPS tree,
  checked against the directory listing; optionally GSE → GSM → SRR metadata through ``pysradb``.

:func:`fetch_source` resolves a spec, downloads every file through :func:`curation.download.download` (resumable,
verified, atomic), extracts the archives named in ``extract``, and writes ``<out>/download.json`` last — so
that file existing means the source is complete. Resolution happens only here (inside a workflow rule), never
while the workflow is parsed. Every API base URL can be overridden in the spec (``api_url`` / ``base_url``),
which is how the tests point the resolvers at a loopback server.

Command line (what the Snakemake download rule calls)::

    python -m curation.sources fetch --name NAME --spec '<fetch spec as JSON>' --out DIR
    python -m curation.sources resolve --spec '<JSON>'        # print the resolved file list, download nothing
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import fnmatch
import html.parser
import json
import logging
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence
from urllib.parse import unquote, urljoin, urlparse

import jsonschema
import pandas as pd
import requests
import yaml
from tqdm.auto import tqdm

from curation.config import dataset_schema
from curation.download import DownloadError, download, extract_archive
from curation.io import CurationError, atomic_path, one_line

log = logging.getLogger("curation.sources")

DEFAULT_MANIFEST = Path(__file__).resolve().parent.parent / "resources" / "datasets.yaml"
RECORD_FILE = "download.json"

FIGSHARE_API = "https://api.figshare.com/v2"
CELLXGENE_API = "https://api.cellxgene.cziscience.com/curation/v1"
GDC_API = "https://api.gdc.cancer.gov"
GEO_BASE = "https://ftp.ncbi.nlm.nih.gov/geo"

KINDS = ("urls", "mirror", "figshare", "cellxgene", "gdc", "geo")
#: GDC fields requested per file; the sample sheet is built from them.
GDC_FIELDS = ("file_id", "file_name", "md5sum", "file_size", "cases.case_id", "cases.submitter_id",
              "cases.project.project_id", "cases.project.primary_site", "cases.samples.submitter_id",
              "cases.samples.sample_type")
HTTP_TIMEOUT_S = 60.0
USER_AGENT = "txfm-diverserna-curation/0.1"

_CHECKSUMS = {"size": {"type": "integer", "minimum": 0}, "md5": {"type": "string", "pattern": "^[0-9a-fA-F]{32}$"},
              "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}}
_NAME = {"type": "string", "minLength": 1}
#: JSON schema of a fetch spec (also referenced by the workflow's config schema).
FETCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["kind"],
    "properties": {
        "kind": {"enum": list(KINDS)},
        "files": {"type": "array", "minItems": 1,
                  "items": {"anyOf": [_NAME, {"type": "object", "properties": {"url": _NAME, "name": _NAME,
                                                                                **_CHECKSUMS}}]}},
        "include": {"type": "array", "items": _NAME},
        "expected": {"type": "object", "additionalProperties": {"type": "object", "properties": _CHECKSUMS,
                                                                "additionalProperties": False}},
        "extract": {"type": "array", "items": {"type": "object", "required": ["archive"], "additionalProperties": False,
                                               "properties": {"archive": _NAME, "into": _NAME,
                                                              "members": {"type": "array", "items": _NAME}}}},
        "url": _NAME, "api_url": _NAME, "base_url": _NAME,
        "article_id": {"type": ["integer", "string"]},
        "collection_id": _NAME, "dataset_id": _NAME, "dataset_version_id": _NAME, "title": _NAME, "filetype": _NAME,
        "name": _NAME, "cell_count": {"type": "integer", "minimum": 0},
        "filters": {"type": "object"}, "dir": _NAME, "sample_sheet": _NAME,
        "page_size": {"type": "integer", "minimum": 1}, "max_files": {"type": "integer", "minimum": 1},
        "accession": {"type": "string", "pattern": "^(GSE|GSM)[0-9]+$"},
        "sra_metadata": {"type": "boolean"},
    },
    "allOf": [
        {"if": {"properties": {"kind": {"const": "urls"}}}, "then": {"required": ["files"]}},
        {"if": {"properties": {"kind": {"const": "mirror"}}}, "then": {"required": ["url"]}},
        {"if": {"properties": {"kind": {"const": "figshare"}}}, "then": {"required": ["article_id"]}},
        {"if": {"properties": {"kind": {"const": "cellxgene"}}},
         "then": {"required": ["collection_id", "name"],
                  "anyOf": [{"required": ["dataset_id"]}, {"required": ["dataset_version_id"]}, {"required": ["title"]}]}},
        {"if": {"properties": {"kind": {"const": "gdc"}}}, "then": {"required": ["filters"]}},
        {"if": {"properties": {"kind": {"const": "geo"}}}, "then": {"required": ["accession", "files"]}},
    ],
}


@dataclass(frozen=True)
class RemoteFile:
    """One file to download: ``url`` → ``<source dir>/<name>`` (``name`` is a relative POSIX path)."""

    name: str
    url: str
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None

    def expected(self) -> dict[str, Any]:
        """What :func:`curation.download.download` must verify (only the checksums that are known)."""
        return {k: v for k, v in (("size", self.size), ("md5", self.md5), ("sha256", self.sha256)) if v is not None}


@dataclass
class Resolution:
    """What a resolver found: the files, a provenance record, and (GDC) a per-file sample sheet."""

    files: list[RemoteFile]
    record: dict[str, Any] = field(default_factory=dict)
    sample_sheet: pd.DataFrame | None = None


# ------------------------------------------------------------------------------------------------ manifest


def curation_keys() -> tuple[str, ...]:
    """Keys of a source entry that belong to the curation dataset config (``curation/dataset.schema.yaml``)."""
    return tuple(dataset_schema()["properties"])


def load_manifest(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read a source manifest (default ``resources/datasets.yaml``) and check every ``fetch`` spec.

    Returns ``{"sources": {name: entry}, "evaluation_screens": {name: entry}, ...}`` as written.
    Raises ``CurationError`` naming the file and the bad entry.
    """
    path = Path(path) if path is not None else DEFAULT_MANIFEST
    try:
        manifest = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CurationError(path, "source manifest not found") from None
    except yaml.YAMLError as exc:
        raise CurationError(path, f"not valid YAML ({one_line(exc)})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sources"), dict):
        raise CurationError(path, "a source manifest must be a mapping with a 'sources' mapping")
    for section in ("sources", "evaluation_screens"):
        for name, entry in (manifest.get(section) or {}).items():
            if not isinstance(entry, dict) or "fetch" not in entry:
                raise CurationError(path, f"{section}.{name}: missing 'fetch'")
            check_fetch_spec(entry["fetch"], f"{path}: {section}.{name}.fetch")
    return manifest


def check_fetch_spec(spec: Mapping[str, Any], where: str) -> None:
    """Raise ``CurationError`` (one line, prefixed with ``where``) when ``spec`` is not a valid fetch spec."""
    validator = jsonschema.Draft202012Validator(FETCH_SCHEMA)
    error = jsonschema.exceptions.best_match(validator.iter_errors(dict(spec)))
    if error is not None:
        location = ".".join(str(p) for p in error.absolute_path)
        raise CurationError(None, f"{where}{'.' + location if location else ''}: {one_line(error.message)}")


def curation_entry(name: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """The curation ``datasets:`` entry of one manifest source, its file paths prefixed with ``<name>/``.

    Manifest paths are relative to the source's own download directory (``<raw_dir>/<name>/``); the curation
    config resolves them against ``raw_dir``.
    """
    keys = set(curation_keys())
    spec = {k: copy.deepcopy(v) for k, v in entry.items() if k in keys}
    if "files" not in spec:
        raise CurationError(None, f"source {name}: no 'files' (curation file roles)")
    prefix = PurePosixPath(name)

    def under(path: str) -> str:
        return path if os.path.isabs(path) else str(prefix / path)

    spec["files"] = {role: [under(p) for p in value] if isinstance(value, list) else under(value)
                     for role, value in spec["files"].items()}
    if spec.get("metadata"):
        spec["metadata"]["file"] = under(spec["metadata"]["file"])
    if spec.get("reader", {}).get("sample_sheet"):
        spec["reader"]["sample_sheet"] = under(spec["reader"]["sample_sheet"])
    return spec


# ------------------------------------------------------------------------------------------------ resolvers


def resolve(spec: Mapping[str, Any], session: requests.Session | None = None) -> Resolution:
    """Turn a fetch spec into the files to download (network access for every kind but urls/file mirrors).

    Manifest checksums in ``expected: {<name>: {size, md5, sha256}}`` are attached to the resolved files; a
    published size or md5 that disagrees with them raises ``CurationError`` (the upstream file changed).
    """
    check_fetch_spec(spec, "fetch")
    session = session or _session()
    kind = spec["kind"]
    resolver = {"urls": _resolve_urls, "mirror": _resolve_mirror, "figshare": resolve_figshare,
                "cellxgene": resolve_cellxgene, "gdc": resolve_gdc, "geo": resolve_geo}[kind]
    resolution = resolver(spec, session)
    resolution.files = _apply_expected(resolution.files, spec.get("expected") or {})
    names = [f.name for f in resolution.files]
    if not names:
        raise CurationError(None, f"fetch {kind}: resolved to no files")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CurationError(None, f"fetch {kind}: several files resolve to the same name: {', '.join(duplicates[:5])}")
    for name in names:
        _check_relative(name)
    resolution.record = {"kind": kind, **resolution.record}
    return resolution


def _session() -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    return session


def _get_json(session: requests.Session, url: str, **kwargs: Any) -> Any:
    """GET (or POST with ``json=``) ``url`` and decode JSON; one-line ``CurationError`` naming the URL."""
    method = "POST" if "json" in kwargs else "GET"
    try:
        resp = session.request(method, url, timeout=HTTP_TIMEOUT_S, **kwargs)
        resp.raise_for_status()
        return resp.json()
    except requests.exceptions.HTTPError as exc:
        raise CurationError(url, f"HTTP {exc.response.status_code} {exc.response.reason}") from None
    except requests.exceptions.RequestException as exc:
        raise CurationError(url, f"request failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    except ValueError:
        raise CurationError(url, "response is not JSON") from None


def _resolve_urls(spec: Mapping[str, Any], session: requests.Session) -> Resolution:
    files = []
    for item in spec["files"]:
        item = {"url": item} if isinstance(item, str) else dict(item)
        if "url" not in item:
            raise CurationError(None, f"fetch urls: entry {item} has no url")
        name = item.get("name") or PurePosixPath(unquote(urlparse(item["url"]).path)).name
        files.append(RemoteFile(name=name, url=item["url"], size=item.get("size"), md5=item.get("md5"),
                                sha256=item.get("sha256")))
    return Resolution(files)


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(PurePosixPath(name).name, p)
                               for p in patterns)


class _LinkParser(html.parser.HTMLParser):
    """Collects the ``href`` targets of an HTML directory index (Apache / nginx / NCBI autoindex)."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.links.append(href)


def list_index(url: str, session: requests.Session | None = None, recursive: bool = True) -> list[tuple[str, str]]:
    """Files under a directory URL as ``(relative name, absolute URL)``, sorted by name.

    ``file://`` directories are walked; HTTP(S) directory-index pages are parsed (links to children only,
    sub-directories — links ending in ``/`` — followed when ``recursive``).
    """
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        root = Path(unquote(parsed.path))
        if not root.is_dir():
            raise CurationError(root, "mirror directory not found")
        return sorted((p.relative_to(root).as_posix(), p.resolve().as_uri())
                      for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if parsed.scheme not in ("http", "https"):
        raise CurationError(url, f"unsupported URL scheme {parsed.scheme!r}")
    session = session or _session()
    base = url if url.endswith("/") else url + "/"
    found: list[tuple[str, str]] = []
    pending = [("", base)]
    while pending:
        prefix, page = pending.pop()
        try:
            resp = session.get(page, timeout=HTTP_TIMEOUT_S)
            resp.raise_for_status()
        except requests.exceptions.HTTPError as exc:
            raise CurationError(page, f"HTTP {exc.response.status_code} {exc.response.reason}") from None
        except requests.exceptions.RequestException as exc:
            raise CurationError(page, f"request failed ({type(exc).__name__})") from None
        parser = _LinkParser()
        parser.feed(resp.text)
        for href in parser.links:
            target = urljoin(page, href)
            if not target.startswith(page) or target == page or "?" in href or href.startswith("#"):
                continue  # parent directory, sort links, absolute links elsewhere
            rel = unquote(target[len(page):])
            if rel.endswith("/"):
                if recursive:
                    pending.append((prefix + rel, target))
            elif "/" not in rel:
                found.append((prefix + rel, target))
    return sorted(set(found))


def _resolve_mirror(spec: Mapping[str, Any], session: requests.Session) -> Resolution:
    listing = list_index(spec["url"], session)
    files = [RemoteFile(name=name, url=url) for name, url in listing if _matches(name, spec.get("include"))]
    return Resolution(files, {"url": spec["url"]})


def resolve_figshare(spec: Mapping[str, Any], session: requests.Session) -> Resolution:
    """figshare / figshare+ article → its files (name, size, md5, download URL) via ``GET /articles/<id>``
    and the paged ``GET /articles/<id>/files``. ``files`` (exact names) and/or ``include`` (globs) select."""
    api = spec.get("api_url", FIGSHARE_API).rstrip("/")
    article_id = spec["article_id"]
    article = _get_json(session, f"{api}/articles/{article_id}")
    listing: list[dict] = []
    page_size = int(spec.get("page_size", 100))
    for page in range(1, 10_000):
        batch = _get_json(session, f"{api}/articles/{article_id}/files", params={"page": page, "page_size": page_size})
        if not isinstance(batch, list):
            raise CurationError(f"{api}/articles/{article_id}/files", "expected a JSON list of files")
        listing.extend(batch)
        if len(batch) < page_size:
            break
    by_name = {item["name"]: item for item in listing}
    wanted = [f if isinstance(f, str) else f["name"] for f in spec.get("files") or []]
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise CurationError(f"{api}/articles/{article_id}", f"no file(s) {', '.join(missing)} in the article "
                                                           f"(has {', '.join(sorted(by_name)[:10])}…)")
    chosen = [by_name[n] for n in wanted] if wanted else [i for i in listing if _matches(i["name"], spec.get("include"))]
    files = [RemoteFile(name=i["name"], url=i["download_url"], size=i.get("size"),
                        md5=(i.get("computed_md5") or i.get("supplied_md5") or None)) for i in chosen]
    record = {"article_id": article_id, "version": article.get("version"), "title": article.get("title"),
              "doi": article.get("doi"), "license": (article.get("license") or {}).get("name"),
              "file_ids": {i["name"]: i.get("id") for i in chosen}}
    return Resolution(files, record)


def resolve_cellxgene(spec: Mapping[str, Any], session: requests.Session) -> Resolution:
    """CELLxGENE collection → one dataset's H5AD asset via ``GET /collections/<id>``; saved as ``name``.

    The dataset is chosen by ``dataset_version_id`` (a pinned version: an error once the collection has
    replaced it), else ``dataset_id``, else the one dataset whose title contains ``title`` (case-insensitive).
    ``cell_count``, when given, must equal the dataset's published cell count.
    """
    api = spec.get("api_url", CELLXGENE_API).rstrip("/")
    url = f"{api}/collections/{spec['collection_id']}"
    collection = _get_json(session, url)
    datasets = collection.get("datasets") or []
    if "dataset_version_id" in spec:
        chosen = [d for d in datasets if d.get("dataset_version_id") == spec["dataset_version_id"]]
        what = f"dataset_version_id {spec['dataset_version_id']} (pinned; a revised dataset gets a new version id)"
    elif "dataset_id" in spec:
        chosen = [d for d in datasets if d.get("dataset_id") == spec["dataset_id"]]
        what = f"dataset_id {spec['dataset_id']}"
    else:
        chosen = [d for d in datasets if spec["title"].lower() in str(d.get("title", "")).lower()]
        what = f"title containing {spec['title']!r}"
    if len(chosen) != 1:
        titles = "; ".join(f"{d.get('dataset_id')} {d.get('title')!r}" for d in datasets[:10])
        raise CurationError(url, f"{len(chosen)} datasets match {what} (collection has: {titles})")
    dataset = chosen[0]
    if "cell_count" in spec and dataset.get("cell_count") != spec["cell_count"]:
        raise CurationError(url, f"dataset {dataset.get('dataset_id')} has {dataset.get('cell_count')} cells, the "
                                 f"manifest expects {spec['cell_count']}")
    filetype = spec.get("filetype", "H5AD")
    assets = [a for a in dataset.get("assets") or [] if a.get("filetype") == filetype]
    if not assets:
        raise CurationError(url, f"dataset {dataset.get('dataset_id')} has no {filetype} asset")
    asset = assets[0]
    record = {"collection_id": spec["collection_id"], "collection_version_id": collection.get("collection_version_id"),
              "collection_name": collection.get("name"), "dataset_id": dataset.get("dataset_id"),
              "dataset_version_id": dataset.get("dataset_version_id"), "title": dataset.get("title"),
              "cell_count": dataset.get("cell_count"), "asset_url": asset["url"]}
    return Resolution([RemoteFile(name=spec["name"], url=asset["url"], size=asset.get("filesize"))], record)


def resolve_gdc(spec: Mapping[str, Any], session: requests.Session) -> Resolution:
    """GDC ``POST /files`` with ``filters`` (paged) → every file by UUID (``/data/<uuid>``, md5 + size) under
    ``dir`` (default ``star_counts``), plus a sample sheet: file_name, sample_id, case_id, project, tissue,
    sample_type, file_id. ``max_files`` caps the list (smoke runs)."""
    api = spec.get("api_url", GDC_API).rstrip("/")
    directory = PurePosixPath(spec.get("dir", "star_counts"))
    page_size = int(spec.get("page_size", 2000))
    hits: list[dict] = []
    while True:
        body = {"filters": spec["filters"], "fields": ",".join(GDC_FIELDS), "format": "JSON",
                "size": page_size, "from": len(hits), "sort": "file_id:asc"}
        data = _get_json(session, f"{api}/files", json=body).get("data") or {}
        page = data.get("hits") or []
        hits.extend(page)
        total = int((data.get("pagination") or {}).get("total", len(hits)))
        if not page or len(hits) >= total or ("max_files" in spec and len(hits) >= spec["max_files"]):
            break
    hits = hits[: spec.get("max_files", len(hits))]
    files, rows = [], []
    for hit in hits:
        case = (hit.get("cases") or [{}])[0]
        sample = (case.get("samples") or [{}])[0]
        project = case.get("project") or {}
        files.append(RemoteFile(name=str(directory / hit["file_name"]), url=f"{api}/data/{hit['file_id']}",
                                size=hit.get("file_size"), md5=hit.get("md5sum")))
        rows.append({"file_name": hit["file_name"], "sample_id": sample.get("submitter_id"),
                     "case_id": case.get("submitter_id"), "project": project.get("project_id"),
                     "tissue": project.get("primary_site"), "sample_type": sample.get("sample_type"),
                     "file_id": hit["file_id"]})
    sheet = pd.DataFrame(rows, columns=["file_name", "sample_id", "case_id", "project", "tissue", "sample_type",
                                        "file_id"])
    return Resolution(files, {"filters": spec["filters"], "n_files": len(files)}, sheet)


def geo_suppl_url(accession: str, base_url: str = GEO_BASE) -> str:
    """The supplementary-file directory of a GEO series or sample, e.g.
    ``GSE176078`` → ``<base>/series/GSE176nnn/GSE176078/suppl/``."""
    match = re.fullmatch(r"(GSE|GSM)(\d+)", accession)
    if not match:
        raise CurationError(None, f"not a GEO series/sample accession: {accession!r}")
    prefix, digits = match.groups()
    stem = f"{prefix}{digits[:-3]}nnn" if len(digits) > 3 else f"{prefix}nnn"
    tree = "series" if prefix == "GSE" else "samples"
    return f"{base_url.rstrip('/')}/{tree}/{stem}/{accession}/suppl/"


def resolve_geo(spec: Mapping[str, Any], session: requests.Session) -> Resolution:
    """GEO supplementary files of ``accession``; each name in ``files`` must appear in the directory listing."""
    directory = geo_suppl_url(spec["accession"], spec.get("base_url", GEO_BASE))
    available = {name for name, _ in list_index(directory, session, recursive=False)}
    wanted = [f if isinstance(f, str) else f["name"] for f in spec["files"]]
    missing = [n for n in wanted if n not in available]
    if missing:
        raise CurationError(directory, f"no file(s) {', '.join(missing)} (listed: {', '.join(sorted(available)[:10])})")
    files = [RemoteFile(name=n, url=directory + n) for n in wanted]
    return Resolution(files, {"accession": spec["accession"], "url": directory})


# ------------------------------------------------------------------------------------------------ fetch


def _apply_expected(files: list[RemoteFile], expected: Mapping[str, Mapping[str, Any]]) -> list[RemoteFile]:
    """Attach manifest checksums to resolved files; a disagreement with a published value is an error."""
    out = []
    for f in files:
        want = expected.get(f.name) or expected.get(PurePosixPath(f.name).name) or {}
        merged = {}
        for key in ("size", "md5", "sha256"):
            published, declared = getattr(f, key), want.get(key)
            if published is not None and declared is not None and str(published).lower() != str(declared).lower():
                raise CurationError(f.url, f"{key} published upstream ({published}) differs from the manifest "
                                           f"({declared}): the file changed; update resources/datasets.yaml")
            merged[key] = published if published is not None else declared
        out.append(RemoteFile(name=f.name, url=f.url, **merged))
    return out


def _check_relative(name: str) -> None:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise CurationError(None, f"refusing unsafe destination name {name!r}")


def fetch_source(name: str, spec: Mapping[str, Any], out_dir: str | os.PathLike, *, progress: bool = True,
                 retries: int = 5, timeout_s: float = 60.0, workers: int = 4,
                 session: requests.Session | None = None) -> dict[str, Any]:
    """Resolve ``spec``, download every file into ``out_dir`` (verified), extract, write ``download.json``.

    ``workers`` parallel transfers (only matters for many-file sources such as GDC). Returns the record
    written to ``<out_dir>/download.json``. Raises ``CurationError`` (resolution) or ``DownloadError``.
    """
    out_dir = Path(out_dir)
    session = session or _session()
    resolution = resolve(spec, session)
    log.info("%s: %d file(s) to fetch into %s", name, len(resolution.files), out_dir)
    many = len(resolution.files) > 8

    def get(f: RemoteFile) -> None:
        download(f.url, out_dir / f.name, f.expected(), retries=retries, timeout_s=timeout_s,
                 progress=progress and not many, session=session)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool, tqdm(
            total=len(resolution.files), unit="file", desc=name, disable=not (progress and many)) as bar:
        for future in concurrent.futures.as_completed([pool.submit(get, f) for f in resolution.files]):
            future.result()
            bar.update(1)

    extracted = []
    for item in spec.get("extract") or []:
        archive = out_dir / item["archive"]
        into = out_dir / item.get("into", PurePosixPath(item["archive"]).name.split(".")[0])
        _check_relative(str(into.relative_to(out_dir)))
        extract_archive(archive, into, item.get("members"))
        extracted.append({"archive": item["archive"], "into": into.relative_to(out_dir).as_posix()})

    record: dict[str, Any] = {"source": name, "resolved": resolution.record,
                              "files": [asdict(f) for f in resolution.files], "extracted": extracted}
    if resolution.sample_sheet is not None:
        sheet_name = spec.get("sample_sheet", "sample_sheet.tsv")
        with atomic_path(out_dir / sheet_name) as tmp:
            resolution.sample_sheet.to_csv(tmp, sep="\t", index=False)
        record["sample_sheet"] = sheet_name
    if spec.get("sra_metadata"):
        record["sra_metadata"] = write_sra_metadata(spec["accession"], out_dir / "sra_metadata.tsv")
    with atomic_path(out_dir / RECORD_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return record


def write_sra_metadata(accession: str, dest: Path) -> str:
    """GSE → GSM → SRR table of ``accession`` via pysradb (optional dependency), written to ``dest`` as TSV.

    Returns the file name written, or a one-line reason why nothing was written (pysradb missing, or the
    SRA query failed) — the metadata is provenance, not an input of curation, so it never fails the fetch.
    """
    try:
        from pysradb.sraweb import SRAweb  # type: ignore[import-not-found]
    except ImportError:
        reason = "skipped: pysradb is not installed (pip install pysradb to store GSE→GSM→SRR metadata)"
        log.warning("%s: %s", accession, reason)
        return reason
    try:
        db = SRAweb()
        if accession.startswith("GSE"):
            table = db.gse_to_gsm(accession, detailed=True)
            gsms = table.iloc[:, 1].dropna().astype(str).tolist() if table is not None and len(table) else []
        else:
            table, gsms = None, [accession]
        runs = db.gsm_to_srr(gsms, detailed=True) if gsms else pd.DataFrame()
        if table is not None and len(table) and len(runs):
            runs = table.merge(runs, how="outer")
    except Exception as exc:  # noqa: BLE001 - any network/parse failure of a third-party client
        reason = f"skipped: pysradb query failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
        log.warning("%s: %s", accession, reason)
        return reason
    with atomic_path(dest) as tmp:
        runs.to_csv(tmp, sep="\t", index=False)
    return dest.name


# ------------------------------------------------------------------------------------------------ CLI


def _parse_spec(text: str) -> dict:
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise CurationError(None, f"--spec is not JSON ({exc})") from None
    if not isinstance(spec, dict):
        raise CurationError(None, "--spec must be a JSON object")
    return spec


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m curation.sources {fetch,resolve}``; exit status 2 with one ``error:`` line on bad input."""
    parser = argparse.ArgumentParser(prog="python -m curation.sources", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info messages")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="resolve and download one source into --out (writes download.json last)")
    fetch.add_argument("--name", required=True, help="source name (for messages and the record)")
    fetch.add_argument("--spec", required=True, help="fetch spec as JSON")
    fetch.add_argument("--out", type=Path, required=True, help="the source's raw directory")
    fetch.add_argument("--retries", type=int, default=5)
    fetch.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP read")
    fetch.add_argument("--workers", type=int, default=4, help="parallel transfers")
    res = sub.add_parser("resolve", help="print the files a fetch spec resolves to (JSON), download nothing")
    res.add_argument("--spec", required=True, help="fetch spec as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        spec = _parse_spec(args.spec)
        if args.command == "resolve":
            resolution = resolve(spec)
            print(json.dumps({"record": resolution.record, "files": [asdict(f) for f in resolution.files]}, indent=1))
        else:
            record = fetch_source(args.name, spec, args.out, progress=not args.quiet, retries=args.retries,
                                  timeout_s=args.timeout, workers=args.workers)
            print(f"{args.name}: {len(record['files'])} file(s) in {args.out}")
    except (CurationError, DownloadError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
