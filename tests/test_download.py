"""Downloads, from a real HTTP server on 127.0.0.1: checked against their SHA-256,
renamed into place whole or not at all."""

import hashlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from makemore import data
from makemore.cli import main
from makemore.data import DataError, registry

NAMES = b"anna\nbob\ncarl\ndora\nemil\nfrida\ngus\nhugo\nines\njon\n"


@pytest.fixture
def server():
    """(routes, base URL): GET /path serves
    ``routes[path] = (body, declared length, seconds to stall after the body)``."""
    routes, requests = {}, []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if self.path not in routes:
                self.send_error(404)
                return
            body, length, stall = routes[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            time.sleep(stall)  # then the handler returns and the server closes the connection (HTTP/1.0)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    routes["/requests"] = requests  # not a route: lets a test see what was asked for
    yield routes, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """Downloads land in a fresh directory, and a stalled one gives up within a second."""
    monkeypatch.setattr(registry, "DATA_DIR", tmp_path)
    monkeypatch.setattr(registry, "DOWNLOAD_TIMEOUT", 1.0)
    return tmp_path


def register(monkeypatch, url: str, payload: bytes, name="tiny") -> None:
    monkeypatch.setitem(
        data.DATASETS, name, data.DatasetInfo(f"{name}.txt", url, hashlib.sha256(payload).hexdigest(), "lines")
    )


def one_line_error(call, match: str) -> str:
    with pytest.raises(DataError, match=match) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_registered_data_set_is_downloaded_checked_and_loaded(server, data_dir, monkeypatch):
    routes, base = server
    routes["/tiny.txt"] = (NAMES, len(NAMES), 0)
    register(monkeypatch, f"{base}/tiny.txt", NAMES)
    source = data.load_source("tiny")
    assert (data_dir / "tiny.txt").read_bytes() == NAMES and [p.name for p in data_dir.iterdir()] == ["tiny.txt"]
    assert sorted(item for split in source.splits for item in source.items(split)) == NAMES.decode().split()
    data.load_source("tiny")  # the second time from the file: no second request
    assert routes["/requests"] == ["/tiny.txt"]


def test_a_url_with_its_sha256_is_downloaded_once(server, data_dir):
    routes, base = server
    routes["/some/names.txt"] = (NAMES, len(NAMES), 0)
    url = f"{base}/some/names.txt#sha256={hashlib.sha256(NAMES).hexdigest().upper()}"
    path, kind, sha256 = data.resolve(url)
    assert path == data_dir / f"{sha256[:16]}-names.txt" and path.read_bytes() == NAMES and kind == "lines"
    assert data.load_source(url, "stream").vocab.chars == sorted(set(NAMES.decode()))
    assert routes["/requests"] == ["/some/names.txt"]


@pytest.mark.parametrize("fragment", ["", "#sha256=abc", "#md5=" + "0" * 32])
def test_a_url_without_a_sha256_is_refused_before_downloading(server, data_dir, fragment):
    routes, base = server
    one_line_error(
        lambda: data.resolve(f"{base}/names.txt{fragment}"),
        r"a URL must name its SHA-256, as in http://.*/names.txt#sha256=<64 hex digits>",
    )
    assert routes["/requests"] == [] and list(data_dir.iterdir()) == []


def test_the_command_line_says_so_in_one_line(server, data_dir, capsys):
    _, base = server
    assert main(["train", "--data", f"{base}/names.txt", "--out", str(data_dir / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "must name its SHA-256" in err


def test_a_wrong_checksum_saves_nothing(server, data_dir, monkeypatch):
    routes, base = server
    routes["/tiny.txt"] = (NAMES, len(NAMES), 0)
    register(monkeypatch, f"{base}/tiny.txt", b"other bytes")
    one_line_error(
        lambda: data.load_source("tiny"),
        r"tiny.txt: SHA-256 [0-9a-f]{64} does not match the expected .*; nothing was saved",
    )
    assert list(data_dir.iterdir()) == []  # no file in place, no .part file left


def test_a_connection_that_drops_halfway_saves_nothing(server, data_dir, monkeypatch):
    routes, base = server
    routes["/tiny.txt"] = (NAMES[:20], len(NAMES), 0)  # promises the whole file, sends 20 bytes, closes
    register(monkeypatch, f"{base}/tiny.txt", NAMES)
    one_line_error(
        lambda: data.load_source("tiny"),
        rf"could not download {base}/tiny.txt \(the connection closed with {len(NAMES) - 20} byte\(s\) "
        r"still to come\); try again, or place the file at .*tiny.txt by hand",
    )
    assert list(data_dir.iterdir()) == []


def test_a_stalled_server_times_out_and_saves_nothing(server, data_dir, monkeypatch):
    routes, base = server
    routes["/tiny.txt"] = (NAMES[:20], len(NAMES), 3)  # keeps the connection open, silent
    register(monkeypatch, f"{base}/tiny.txt", NAMES)
    started = time.monotonic()
    one_line_error(lambda: data.load_source("tiny"), r"could not download .*tiny.txt \(timed out\)")
    assert time.monotonic() - started < 2.5 and list(data_dir.iterdir()) == []


def test_a_server_that_is_down(data_dir, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    register(monkeypatch, f"http://127.0.0.1:{port}/tiny.txt", NAMES)
    one_line_error(
        lambda: data.load_source("tiny"),
        r"could not download http://127.0.0.1:\d+/tiny.txt \(.*[Cc]onnection refused\)",
    )
    assert list(data_dir.iterdir()) == []


def test_a_missing_file_on_the_server(server, data_dir, monkeypatch):
    _, base = server
    register(monkeypatch, f"{base}/gone.txt", NAMES)
    one_line_error(lambda: data.load_source("tiny"), r"could not download .*/gone.txt \(HTTP Error 404: Not Found\)")
    assert list(data_dir.iterdir()) == []


def test_an_altered_file_in_place_is_reported_not_used(server, data_dir, monkeypatch):
    routes, base = server
    register(monkeypatch, f"{base}/tiny.txt", NAMES)
    (data_dir / "tiny.txt").write_bytes(NAMES.replace(b"anna", b"anne"))
    one_line_error(
        lambda: data.load_source("tiny"),
        r"tiny.txt: SHA-256 does not match the registered .*delete the file to download it again",
    )
    assert routes["/requests"] == []
