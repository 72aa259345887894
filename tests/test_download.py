"""The download stage's library against a loopback HTTP server started here."""

import hashlib
import http.server
import socket
import threading
import time

import pytest

from charlm.download import DATA_FILE_ENV, DownloadConfig, DownloadError, download

BODY = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
SHA = hashlib.sha256(BODY).hexdigest()
FAST = DownloadConfig(timeout=1.0, retries=3, backoff=0.01, max_bytes=1 << 20, max_redirects=3)


class Handler(http.server.BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        if not any(k == "Content-Length" for k, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the client gave up (the timeout test): nothing to do
            pass

    def do_GET(self):
        Handler.hits[self.path] = Handler.hits.get(self.path, 0) + 1
        if self.path == "/ok":
            self._send(200, BODY)
        elif self.path == "/missing":
            self._send(404, b"not found")
        elif self.path == "/truncated":
            self._send(200, BODY[:100], [("Content-Length", str(len(BODY)))])
            self.close_connection = True
        elif self.path == "/flaky":
            self._send(500 if Handler.hits[self.path] == 1 else 200, BODY)
        elif self.path == "/always500":
            self._send(503, b"busy")
        elif self.path == "/slow":
            time.sleep(3)  # beyond FAST.timeout
            self._send(200, BODY)
        elif self.path == "/endless":
            self.send_response(200)
            self.end_headers()
            for _ in range(4096):  # bounded: 4096 x 1 KiB, more than the 1 MiB cap
                try:
                    self.wfile.write(b"x" * 1024)
                except OSError:
                    return
        elif self.path == "/loop":
            self._send(302, headers=[("Location", "/loop")])
        elif self.path == "/hop":
            self._send(302, headers=[("Location", "/ok")])
        else:
            self._send(400)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def fetch(url, out, sha=SHA, cfg=FAST, env=None):
    return download(url, out, sha, cfg, env=env or {}, log=lambda _: None)


def test_success_writes_verified_file(server, tmp_path):
    out = tmp_path / "data" / "input.txt"
    assert fetch(f"{server}/ok", out) == SHA
    assert out.read_bytes() == BODY
    assert list(out.parent.iterdir()) == [out]  # no temp file left behind


def test_redirect_is_followed(server, tmp_path):
    fetch(f"{server}/hop", tmp_path / "x")
    assert (tmp_path / "x").read_bytes() == BODY


@pytest.mark.parametrize(
    ("path", "sha", "message"),
    [
        ("/missing", SHA, "HTTP 404"),
        ("/ok", "0" * 64, "sha256 mismatch"),
        ("/truncated", SHA, "cut short"),
        ("/always500", SHA, "after 3 tries: HTTP 503"),
        ("/slow", SHA, "timed out"),
        ("/endless", "", "cap"),
        ("/loop", SHA, "redirect"),
    ],
)
def test_failures_are_one_clear_line_and_leave_nothing(server, tmp_path, path, sha, message):
    out = tmp_path / "input.txt"
    with pytest.raises(DownloadError) as info:
        fetch(f"{server}{path}", out, sha=sha)
    text = str(info.value)
    assert message in text and f"{server}{path}" in text and DATA_FILE_ENV in text
    assert "\n" not in text
    assert list(tmp_path.iterdir()) == []


def test_500_then_success_is_retried(server, tmp_path):
    Handler.hits.pop("/flaky", None)
    fetch(f"{server}/flaky", tmp_path / "x")
    assert Handler.hits["/flaky"] == 2


def test_connection_refused(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="cannot connect"):
        fetch(f"http://127.0.0.1:{port}/input.txt", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_local_copy_from_environment_variable_skips_the_network_and_says_so(tmp_path):
    local = tmp_path / "copy.txt"
    local.write_bytes(BODY)
    out = tmp_path / "out" / "input.txt"
    lines = []
    download("http://127.0.0.1:9/unreachable", out, SHA, FAST, env={DATA_FILE_ENV: str(local)}, log=lines.append)
    assert out.read_bytes() == BODY
    assert any(f"used the local copy {DATA_FILE_ENV}={local}" in line for line in lines)


def test_local_copy_is_refused_when_the_corpus_is_not_pinned(tmp_path):
    # DVC does not track environment variables: an unpinned corpus read from one would be invisible to it.
    local = tmp_path / "copy.txt"
    local.write_bytes(BODY)
    with pytest.raises(DownloadError, match=f"{DATA_FILE_ENV} is set but data.sha256 is empty") as info:
        fetch("http://127.0.0.1:9/unreachable", tmp_path / "x", sha="", env={DATA_FILE_ENV: str(local)})
    assert "set data.url to" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "x").exists()


def test_a_wrong_local_copy_is_named_as_such(tmp_path):
    local = tmp_path / "other.txt"
    local.write_bytes(b"not the corpus\n")
    with pytest.raises(DownloadError, match=f"the local copy {DATA_FILE_ENV}=.*other.txt is not the pinned corpus"):
        fetch("http://127.0.0.1:9/unreachable", tmp_path / "x", env={DATA_FILE_ENV: str(local)})
    assert not (tmp_path / "x").exists()


def test_file_url_and_plain_path(tmp_path):
    local = tmp_path / "copy.txt"
    local.write_bytes(BODY)
    fetch(local.as_uri(), tmp_path / "a")
    fetch(str(local), tmp_path / "b")
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() == BODY


def test_unsupported_scheme_and_missing_local_file(tmp_path):
    with pytest.raises(DownloadError, match="unsupported URL scheme 'ftp'"):
        fetch("ftp://example.org/input.txt", tmp_path / "x")
    with pytest.raises(DownloadError, match="cannot read"):
        fetch(str(tmp_path / "absent.txt"), tmp_path / "x")


def test_empty_sha_accepts_and_warns(server, tmp_path):
    lines = []
    assert download(f"{server}/ok", tmp_path / "x", "", FAST, env={}, log=lines.append) == SHA
    assert any("not pinned" in line and SHA in line for line in lines)
