"""The hub: sources in order, checksums, cache, offline mode, and errors that list what was tried."""

import hashlib
import http.server
import threading
from functools import partial

import pytest

from lmforge import hub
from lmforge.hub import Entry, HubError, RemoteFile, Source, fetch, fetch_file


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LMFORGE_MIRROR", raising=False)
    monkeypatch.delenv("LMFORGE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def server(tmp_path):
    """A loopback HTTP server over a folder, answering Range requests (for resumed downloads)."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            path = root / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            rng = self.headers.get("Range")
            start = int(rng.split("=")[1].split("-")[0]) if rng else 0
            self.send_response(206 if rng else 200)
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:])

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_unknown_name_lists_known_ones():
    with pytest.raises(HubError, match="unknown name 'gpt5'.*smollm2-135m-instruct.*the-verdict"):
        fetch("gpt5")


def test_url_download_verified_cached_and_resumed(server, tmp_path):
    root, base = server
    data = b"The Verdict " * 1000
    (root / "v.txt").write_bytes(data)
    entry = Entry("demo", "dataset", "demo", (RemoteFile("v.txt", _sha(data), (Source("url", base + "/v.txt"),)),))
    part = tmp_path / "cache" / "demo" / "v.txt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:5000])  # an interrupted earlier download
    path = fetch_file(entry, entry.main)
    assert path.read_bytes() == data and not part.exists()
    (root / "v.txt").unlink()
    assert fetch_file(entry, entry.main) == path  # served from the cache now


def test_checksum_mismatch_deletes_and_names_digests(server):
    root, base = server
    (root / "v.txt").write_bytes(b"tampered")
    entry = Entry("demo", "dataset", "demo", (RemoteFile("v.txt", "0" * 64, (Source("url", base + "/v.txt"),)),))
    with pytest.raises(HubError) as e:
        fetch_file(entry, entry.main)
    msg = str(e.value)
    assert "checksum mismatch for v.txt" in msg and "0" * 64 in msg and _sha(b"tampered") in msg
    assert not (hub.cache_dir() / "demo" / "v.txt").exists()


def test_mirror_then_sources_and_every_failure_listed(tmp_path, monkeypatch, server):
    _, base = server
    entry = Entry("demo", "dataset", "demo", (RemoteFile("x.txt", None, (
        Source("url", base + "/missing.txt"), Source("url", "http://127.0.0.1:9/nothing"))),))
    with pytest.raises(HubError) as e:
        fetch_file(entry, entry.main)
    msg = str(e.value)
    assert "LMFORGE_MIRROR not set" in msg and "missing.txt" in msg and "127.0.0.1:9" in msg
    mirror = tmp_path / "mirror"
    (mirror / "demo").mkdir(parents=True)
    (mirror / "demo" / "x.txt").write_text("from the mirror")
    monkeypatch.setenv("LMFORGE_MIRROR", str(mirror))
    assert fetch_file(entry, entry.main).read_text() == "from the mirror"


def test_offline_mode_tries_only_local_sources(monkeypatch):
    monkeypatch.setenv("LMFORGE_OFFLINE", "1")
    with pytest.raises(HubError, match="skipped \\(offline mode\\)"):
        fetch("the-verdict")


def test_shared_data_works_as_a_mirror(monkeypatch):
    from conftest import SHARED, shared_file

    shared_file("the-verdict.txt")
    monkeypatch.setenv("LMFORGE_MIRROR", str(SHARED))
    monkeypatch.setenv("LMFORGE_OFFLINE", "1")
    path = fetch("the-verdict")
    assert path.read_text(encoding="utf-8").startswith("I HAD always thought Jack Gisburn")
