"""Guides and masks over http(s): a real HTTP server on loopback answers with what servers do
(200, 404, 403, 5xx, 429 then 200, a dropped connection), and `read_bytes` retries only what
may succeed when tried again, and names the status it got."""

from __future__ import annotations

import contextlib
import http.server
import io
import socket
import threading
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipeline.fetch import prepare
from tasks.images import READ_ATTEMPTS, InputError, read_bytes

PNG = io.BytesIO()
Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(PNG, "PNG")


class Answers(http.server.BaseHTTPRequestHandler):
    """/ok.png, /404, /403, /500, /drop, /busy: 429 for the first two GETs, then the PNG, and
    /private.png: 403 without the header `Authorization: Bearer T`."""

    gets: Counter = Counter()
    sent = 0  # bytes of /huge.png written

    def do_GET(self):  # noqa: N802 (http.server's name)
        route = self.path.split("?", 1)[0]  # what a signed URL's query string leaves
        if self.command == "GET":
            self.gets[self.path] += 1
        if route == "/huge.png":  # 64 MiB, whatever Range says (as `python -m http.server`)
            self.send_response(200)
            self.send_header("Content-Length", str(64 << 20))
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(64):
                    self.wfile.write(bytes(1 << 20))
                    Answers.sent += 1 << 20
            return
        if route == "/drop":
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        status = {"/404": 404, "/403": 403, "/500": 500}.get(route, 200)
        if route == "/private.png" and self.headers.get("Authorization") != "Bearer T":
            status = 403
        if route == "/busy" and self.gets[self.path] <= 2:
            status = 429
        body = PNG.getvalue() if status == 200 else b""
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    Answers.gets = Counter()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_an_image_over_http_is_read(server):
    assert read_bytes(f"{server}/ok.png", {}) == PNG.getvalue()


@pytest.mark.parametrize("path, status", [("/404", "HTTP 404 Not Found"),
                                          ("/403", "HTTP 403 Forbidden")])
def test_final_statuses_are_not_retried_and_are_named(server, path, status):
    with pytest.raises(InputError) as failed:
        read_bytes(f"{server}{path}", {})
    assert str(failed.value) == f"cannot read {server}{path}: {status}"
    assert failed.value.stage == "read" and Answers.gets[path] == 1  # one GET, no HEAD first


def test_server_errors_and_dropped_connections_are_retried_then_named(server):
    for path, reason in (("/500", "HTTP 500 Internal Server Error"),
                         ("/drop", "ServerDisconnectedError: Server disconnected")):
        with pytest.raises(InputError) as failed:
            read_bytes(f"{server}{path}", {})
        assert str(failed.value) == (f"cannot read {server}{path} after {READ_ATTEMPTS} "
                                     f"attempts: {reason}")
    assert Answers.gets["/500"] == READ_ATTEMPTS


def test_throttling_is_waited_out(server):
    assert read_bytes(f"{server}/busy", {}) == PNG.getvalue()
    assert Answers.gets["/busy"] >= 3  # the first two GETs were answered 429


def test_signed_urls_are_retried_and_name_their_status_like_any_url(server):
    """fsspec.open took a URL's '?' for a glob character and wrapped every failure in a
    FileNotFoundError of its own: never retried, always "not found"."""
    signed = "?X-Amz-Credential=AK&X-Amz-Signature=S1G"
    assert read_bytes(f"{server}/busy{signed}", {}) == PNG.getvalue()
    assert Answers.gets[f"/busy{signed}"] == 3  # 429, 429, then the image: one GET each
    with pytest.raises(InputError) as failed:
        read_bytes(f"{server}/403{signed}", {})
    assert str(failed.value) == f"cannot read {server}/403{signed}: HTTP 403 Forbidden"


def test_a_huge_answer_is_cut_off_at_the_byte_limit_not_downloaded(server):
    """fsspec's cat_file reads a whole body, and a server that ignores Range sends it all."""
    with pytest.raises(InputError, match=r"huge.png is larger than 1,000 bytes"):
        read_bytes(f"{server}/huge.png", {}, max_bytes=1000)
    time.sleep(0.5)  # the server notices the closed connection
    assert Answers.sent < 16 << 20


def test_a_host_that_does_not_answer_is_one_rows_error(closed_port):
    with pytest.raises(InputError, match=rf"after {READ_ATTEMPTS} attempts: ClientConnectorError: "
                                         rf"Cannot connect to host 127.0.0.1:{closed_port}"):
        read_bytes(f"http://127.0.0.1:{closed_port}/a.png", {})


def test_the_fetch_step_decodes_guides_over_http(server):
    guide, mask = prepare(f"{server}/ok.png", None, 8, {}, max_pixels=10**6)
    assert guide == bytes([90]) * (8 * 8 * 3) and mask is None


def test_an_object_stores_options_do_not_reach_http_reads(server):
    store = {"endpoint_url": "http://127.0.0.1:9", "key": "AK", "secret": "SK",
             "client_kwargs": {"region_name": "eu"}}  # for s3:// URIs
    assert read_bytes(f"{server}/ok.png", store) == PNG.getvalue()  # was "file not found"
    with pytest.raises(InputError, match="HTTP 403 Forbidden"):
        read_bytes(f"{server}/private.png", store)
    scoped = {**store, "http": {"headers": {"Authorization": "Bearer T"}}}
    assert read_bytes(f"{server}/private.png", scoped) == PNG.getvalue()


def test_options_apply_by_protocol():
    from tasks.images import options_for

    options = {"endpoint_url": "http://s3:9000", "client_kwargs": {"region_name": "eu"},
               "s3": {"anon": False}, "https": {"headers": {"Authorization": "Bearer T"}}}
    assert options_for("s3://b/x.png", options) == {
        "endpoint_url": "http://s3:9000", "client_kwargs": {"region_name": "eu"}, "anon": False}
    assert options_for("gs://b/x.png", options) == {
        "endpoint_url": "http://s3:9000", "client_kwargs": {"region_name": "eu"}}
    assert options_for("https://h/x.png", options) == {"headers": {"Authorization": "Bearer T"}}
    assert options_for("http://h/x.png", options) == {}
    assert options_for("/data/x.png", options) == options_for("file:///x.png", options) == {}
    # a chained URI: each layer's own under its protocol, the unscoped ones to the store
    assert options_for("zip://x.png::s3://b/a.zip", {**options, "zip": {"allowZip64": True}}) == {
        "zip": {"allowZip64": True}, "s3": {"endpoint_url": "http://s3:9000",
                                            "client_kwargs": {"region_name": "eu"}, "anon": False}}
    assert options_for("tar://x.png::https://h/a.tar", options) == {
        "https": {"headers": {"Authorization": "Bearer T"}}}
    assert options_for("zip://x.png::/data/a.zip", options) == {}
    assert options_for("simplecache::s3://b/a.png", {"simplecache": {"cache_storage": "/c"},
                                                      "anon": True}) == {
        "simplecache": {"cache_storage": "/c"}, "s3": {"anon": True}}
