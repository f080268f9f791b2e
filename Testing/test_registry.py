"""The model registry: verified, resumable, atomic downloads from a real HTTP server on loopback; import from a zip
or a folder; verify, info, delete; the catalog and its schema; and a light module (no torch)."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from segment_helpers import model_info

from mim3d import registry
from mim3d.__main__ import main
from mim3d.errors import BadInputError, Cancelled
from mim3d.models import build_segmenter
from mim3d.package import MODEL_JSON, WEIGHTS, save_package
from mim3d.protocol import EXIT_BAD_INPUT, EXIT_OK, parse_line

REPO = Path(__file__).resolve().parents[1]
TINY = dict(embed_dims=(12, 24, 48, 96), depths=(1, 1, 1, 1), num_heads=2)  # a real mim-unetr with small weights


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_segmenter("mim-unetr", 3, preset="small", roi_size=(64, 64, 64), **TINY)
    folder = tmp_path_factory.mktemp("pkg") / "tiny"
    info = model_info(roi_size=(64, 64, 64))
    config = {**info.architecture["config"], **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}}
    save_package(folder, model, dataclasses.replace(info, name="tiny-abdomen",
                                                    architecture={**info.architecture, "config": config}))
    return folder


def zip_folder(folder: Path, archive: Path, top: str | None = "tiny-abdomen", alter=None) -> Path:
    """``folder``'s package files in a zip (under ``top``/ if given); ``alter(name, bytes)`` may change a file."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for name in (MODEL_JSON, WEIGHTS):
            data = (folder / name).read_bytes()
            zf.writestr(f"{top}/{name}" if top else name, alter(name, data) if alter else data)
    return archive


class Server:
    """A loopback HTTP server for one file that honours Range requests, records them, and can cut a response."""

    def __init__(self, data: bytes):
        self.data, self.ranges, self.cut_after = data, [], None
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the name http.server calls
                start = 0
                header = self.headers.get("Range")
                server.ranges.append(header)
                if header:
                    start = int(header.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(server.data) - 1}/{len(server.data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(server.data) - start))
                self.end_headers()
                body = server.data[start:]
                if server.cut_after is not None:  # the connection drops mid-way
                    body, server.cut_after = body[: server.cut_after], None
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/tiny-abdomen-1.0.0.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def archive(package, tmp_path) -> bytes:
    return zip_folder(package, tmp_path / "tiny.zip").read_bytes()


@pytest.fixture
def serve():
    servers = []

    def start(data: bytes) -> Server:
        servers.append(Server(data))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def entry_for(url: str, data: bytes, **changes) -> registry.CatalogEntry:
    raw = {"id": "tiny-abdomen", "name": "Tiny abdomen (test)", "version": "1.0.0", "url": url,
           "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "description": "a test package",
           "licence": "Apache-2.0", "expected": {"gpu_seconds": None, "cpu_seconds": 1.5, "gpu_memory_gb": None,
                                                 "cpu_memory_gb": 0.5}, **changes}
    return registry.check_entry(raw, "test catalog: models[0]")


def test_a_good_download_is_verified_and_installed(archive, serve, mim3d_home):
    server = serve(archive)
    events = []
    path = registry.download(entry_for(server.url, archive), progress=lambda *e: events.append(e))
    assert path == mim3d_home / "models" / "tiny-abdomen"
    assert registry.verify("tiny-abdomen").name == "tiny-abdomen"
    assert [m.id for m in registry.list_installed()] == ["tiny-abdomen"]
    assert events[-1] == ("verify", 1.0, "installed tiny-abdomen 1.0.0")
    assert [e[1] for e in events if e[0] == "download"][-1] == 1.0
    assert not list((mim3d_home / "models" / ".downloads").iterdir())
    assert sorted(p.name for p in (mim3d_home / "models").iterdir()) == [".downloads", "tiny-abdomen"]


def test_tampered_bytes_are_refused_and_nothing_is_installed(archive, serve, mim3d_home):
    tampered = bytearray(archive)
    tampered[len(tampered) // 2] ^= 0xFF
    server = serve(bytes(tampered))
    with pytest.raises(BadInputError, match="does not match the catalog .*SHA-256.* corrupt or was altered"):
        registry.download(entry_for(server.url, archive))
    assert registry.list_installed() == []
    assert not list((mim3d_home / "models" / ".downloads").iterdir())


def test_a_package_whose_weights_fail_their_own_checksum_is_refused_after_download(package, serve, mim3d_home,
                                                                                   tmp_path):
    def flip(name, data):
        return data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:] if name == WEIGHTS else data

    altered = zip_folder(package, tmp_path / "altered.zip", alter=flip).read_bytes()
    server = serve(altered)
    with pytest.raises(BadInputError, match=f"not a usable model package: .*{WEIGHTS}: SHA-256 does not match"):
        registry.download(entry_for(server.url, altered))
    assert registry.list_installed() == []
    assert [p.name for p in (mim3d_home / "models").iterdir()] == [".downloads"]


def test_an_interrupted_download_resumes_with_a_range_request(archive, serve, mim3d_home):
    server = serve(archive)
    server.cut_after = len(archive) // 3
    entry = entry_for(server.url, archive)
    with pytest.raises(BadInputError, match=r"download interrupted after \d+ of \d+ bytes .* run the same command"):
        registry.download(entry)
    part = mim3d_home / "models" / ".downloads" / "tiny-abdomen-1.0.0.zip.part"
    assert part.stat().st_size == len(archive) // 3
    events = []
    registry.download(entry, progress=lambda *e: events.append(e))
    assert server.ranges == [None, f"bytes={len(archive) // 3}-"]
    assert any(e[2].endswith("(resumed)") for e in events)
    assert registry.verify("tiny-abdomen").version == "1.0.0"


def test_a_cancelled_download_keeps_its_partial_file_and_the_next_one_resumes(archive, serve, mim3d_home):
    server = serve(archive)
    entry = entry_for(server.url, archive)
    with pytest.raises(Cancelled, match="run it again to resume"):
        registry.download(entry, cancel=lambda: True)
    assert (mim3d_home / "models" / ".downloads" / "tiny-abdomen-1.0.0.zip.part").stat().st_size == \
        registry.CHUNK_BYTES
    registry.download(entry)
    assert server.ranges[-1] == f"bytes={registry.CHUNK_BYTES}-"
    assert [m.id for m in registry.list_installed()] == ["tiny-abdomen"]


def test_import_from_a_zip_and_from_a_folder(package, tmp_path, mim3d_home):
    flat = zip_folder(package, tmp_path / "flat.zip", top=None)
    assert registry.import_package(flat) == mim3d_home / "models" / "tiny-abdomen"
    assert registry.import_package(package, "tiny-copy") == mim3d_home / "models" / "tiny-copy"
    assert [m.id for m in registry.list_installed()] == ["tiny-abdomen", "tiny-copy"]
    with pytest.raises(BadInputError, match="model 'tiny-abdomen' is already installed"):
        registry.import_package(zip_folder(package, tmp_path / "nested.zip"))
    assert sorted(p.name for p in (mim3d_home / "models").iterdir()) == ["tiny-abdomen", "tiny-copy"]


def test_a_zip_writing_outside_its_folder_is_refused(package, tmp_path, mim3d_home):
    evil = zip_folder(package, tmp_path / "evil.zip", top=None)
    with zipfile.ZipFile(evil, "a") as zf:
        zf.writestr("../../outside.txt", "gotcha")
    with pytest.raises(BadInputError, match=r"member '../../outside.txt' would be written outside"):
        registry.import_package(evil)
    assert not (tmp_path / "outside.txt").exists() and registry.list_installed() == []


def test_delete_removes_a_model_and_an_unknown_id_is_named(package, mim3d_home):
    registry.import_package(package)
    registry.delete("tiny-abdomen")
    assert registry.list_installed() == [] and not (mim3d_home / "models" / "tiny-abdomen").exists()
    with pytest.raises(BadInputError, match="model 'tiny-abdomen' is not installed in .* \\(installed: none\\)"):
        registry.delete("tiny-abdomen")
    with pytest.raises(BadInputError, match="model id '../etc'"):
        registry.delete("../etc")


def test_verify_reports_weights_altered_after_installation(package, mim3d_home):
    folder = registry.import_package(package)
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[100] ^= 0xFF
    (folder / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(BadInputError, match=f"{WEIGHTS}: SHA-256 does not match model.json"):
        registry.verify("tiny-abdomen")


def test_a_broken_installed_folder_is_listed_with_its_problem(mim3d_home):
    (mim3d_home / "models" / "half").mkdir(parents=True)
    (mim3d_home / "models" / ".tiny.staging.x").mkdir()
    [broken] = registry.list_installed()
    assert broken.id == "half" and broken.info is None and "no model.json" in broken.problem


def test_catalog_entries_are_checked_against_the_schema(tmp_path):
    good = entry_for("https://example.org/m.zip", b"zip")
    assert good.expected["cpu_seconds"] == 1.5
    raw = _raw(good)
    for change, message in [({"sha256": "abc"}, r"models\[0\].sha256: must be 64 lower-case hexadecimal"),
                            ({"size": 0}, r"models\[0\].size: 0 must be the archive's size"),
                            ({"url": "ftp://x"}, r"models\[0\].url: 'ftp://x' must be an http\(s\) URL"),
                            ({"version": "one"}, r"models\[0\].version: 'one' is not a semantic version"),
                            ({"sha265": "typo"}, r"models\[0\]: unknown field\(s\) \['sha265'\]"),
                            ({"expected": {"cpu_seconds": 1}}, r"expected: field 'gpu_seconds' is missing")]:
        catalog = tmp_path / "Models.json"
        catalog.write_text(json.dumps({"models": [{**raw, **change}]}))
        with pytest.raises(BadInputError, match=message):
            registry.list_available(catalog)
    missing = {k: v for k, v in raw.items() if k != "licence"}
    catalog.write_text(json.dumps({"models": [missing]}))
    with pytest.raises(BadInputError, match=r"models\[0\]: field 'licence' is missing"):
        registry.list_available(catalog)


def test_the_shipped_catalog_is_valid_and_its_schema_states_the_same_fields():
    assert registry.DEFAULT_CATALOG == REPO / "MiMSegmentation" / "mim3d" / "catalog" / "Models.json"
    assert registry.list_available() == []  # no published model yet
    schema = json.loads((REPO / "MiMSegmentation" / "mim3d" / "catalog" / "Models.schema.json").read_text())
    entry = schema["$defs"]["entry"]
    assert set(entry["required"]) == {k for k, (_, required) in registry.ENTRY_FIELDS.items() if required}
    assert set(entry["properties"]) == set(registry.ENTRY_FIELDS)
    assert entry["properties"]["expected"]["required"] == list(registry.EXPECTED_FIELDS)


def test_models_home_follows_mim3d_home(mim3d_home, monkeypatch, tmp_path):
    assert registry.models_home() == mim3d_home / "models"
    monkeypatch.delenv("MIM3D_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert registry.models_home() == tmp_path / ".mim3d" / "models"


def test_models_command_imports_lists_shows_verifies_downloads_and_deletes(package, archive, serve, mim3d_home,
                                                                           tmp_path, capsys):
    def models(*argv) -> tuple[int, dict]:
        code = main(["models", *map(str, argv)])
        events = [e for e in map(parse_line, capsys.readouterr().out.splitlines()) if e]
        return code, events[-1]

    assert models("import", package, "--id", "local")[1] == {"type": "result", "id": "local",
                                                              "path": str(mim3d_home / "models" / "local")}
    server = serve(archive)
    catalog = tmp_path / "Models.json"
    catalog.write_text(json.dumps({"models": [{**_raw(entry_for(server.url, archive))}]}))
    code, result = models("download", "tiny-abdomen", "--catalog", catalog)
    assert code == EXIT_OK and result["path"] == str(mim3d_home / "models" / "tiny-abdomen")
    code, listing = models("list", "--catalog", catalog)
    assert [m["id"] for m in listing["installed"]] == ["local", "tiny-abdomen"]
    assert listing["installed"][0]["labels"] == ["tissue", "right edge"]
    assert listing["available"][0]["installed"] is True
    code, shown = models("info", "local")
    assert [label["name"] for label in shown["labels"]] == ["tissue", "right edge"]
    assert shown["provenance"] == {"trained_on": "nothing (random weights)"}
    assert models("verify")[1]["verified"] == {"local": "ok", "tiny-abdomen": "ok"}
    assert models("delete", "local")[1] == {"type": "result", "id": "local", "deleted": True}
    code, error = models("info", "local")
    assert code == EXIT_BAD_INPUT and error["message"].startswith("model 'local' is not installed")


def _raw(entry: registry.CatalogEntry) -> dict:
    return {k: getattr(entry, k) for k in registry.ENTRY_FIELDS if hasattr(entry, k)}


def test_the_registry_and_its_command_import_without_torch_numpy_or_simpleitk():
    code = ("import sys\n"
            "for name in ('torch', 'numpy', 'SimpleITK', 'monai', 'safetensors'):\n"
            "    sys.modules[name] = None\n"
            "import mim3d.registry, mim3d.registry_cli\n"
            "from mim3d.__main__ import main\n"
            "sys.exit(main(['models', 'list']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert parse_line(proc.stdout.splitlines()[-1])["type"] == "result"
