"""`prime serve --allow-remote-images` (issue #20): http(s) image_url parts fetched from a real
image server on loopback (http.server in a thread) into the tiny vision model (tiny_vision.py)
through a real uvicorn server. Every way a URL can abuse the server (redirect loops, endless or
oversized bodies, stalls, drips, non-images, other schemes, private addresses) is a 4xx naming
the part, and the image server sees what the prime server did and did not do."""

from __future__ import annotations

import ipaddress
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from test_server import running
from test_server_vision import QUESTION, ask, model, post, vision_dir  # noqa: F401  (module fixtures)
from tiny_vision import image_url, png_bytes

from jarvis_prime.serving.remote_images import address_refusal
from jarvis_prime.serving.settings import ServerConfig

MAX_IMAGE_BYTES = 100_000  # the 128x96 test PNG fits
PNG = png_bytes(0)
CHUNK = b"\0" * 16384


class ImageServer(ThreadingHTTPServer):
    """A loopback web server with one route per behaviour; it records every path asked for
    and how each endless response ended."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ImageHandler)
        self.seen: list[str] = []
        self.endless_stopped = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ImageHandler(BaseHTTPRequestHandler):
    server: ImageServer

    def log_message(self, *args) -> None:
        pass

    def reply(self, status: int, body: bytes = b"", kind: str = "image/png", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802  (http.server's name)
        self.server.seen.append(self.path)
        route = self.path.split("?")[0]
        if route == "/ok.png":
            self.reply(200, PNG)
        elif route == "/hop":  # two redirects, then the image
            self.reply(302, Location="/hop2")
        elif route == "/hop2":
            self.reply(301, Location=f"{self.server.url}/ok.png")
        elif route == "/loop":
            self.reply(302, Location="/loop")
        elif route == "/to-file":
            self.reply(302, Location="file:///etc/passwd")
        elif route == "/big.png":  # honest about its size
            self.reply(200, png_bytes(0, (400, 300)))
        elif route == "/endless.png":  # no length, never ends: only the reader's cap stops it
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                while True:
                    self.wfile.write(CHUNK)
            except OSError:
                self.server.endless_stopped.set()
        elif route == "/stall.png":  # headers, then nothing
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            time.sleep(5)
        elif route == "/drip.png":  # a byte at a time, each read in time, the whole far too slow
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            try:
                for byte in PNG[:200]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        elif route == "/page.html":
            self.reply(200, b"<html>not a picture</html>", kind="text/html; charset=utf-8")
        elif route == "/fake.png":  # says image/png, holds text
            self.reply(200, b"plain text, not pixels")
        elif route == "/zipped.png":
            self.reply(200, PNG, Content_Encoding="gzip")
        else:
            self.reply(404, b"no such thing", kind="text/plain")


@pytest.fixture(scope="module")
def images():
    server = ImageServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def config(vision_dir: Path, **options) -> ServerConfig:
    return ServerConfig(model=str(vision_dir), backend="llamacpp", max_image_bytes=MAX_IMAGE_BYTES, **options)


@pytest.fixture(scope="module")
def lan_server(vision_dir):
    """Remote images on, loopback allowed (the image server's address), short timeouts."""
    with running(config(vision_dir, allow_remote_images=True, allow_private_image_hosts=True,
                        image_fetch_timeout_s=1.0, image_fetch_total_s=2.0)) as url:
        yield url


@contextmanager
def checked(images: ImageServer):
    """The paths the image server was asked for while the block ran."""
    before = len(images.seen)
    asked: list[str] = []
    yield asked
    asked.extend(images.seen[before:])


def test_a_remote_image_is_answered_as_the_same_image_inline(lan_server, images, model):
    expected = model.chat(ask(image_url(0)), max_new_tokens=4, temperature=0.0)
    for path in ("/ok.png", "/hop"):  # directly, and through two redirects
        status, payload = post(lan_server, ask(f"{images.url}{path}"), temperature=0)
        assert status == 200, payload
        assert payload["choices"][0]["message"]["content"] == expected
        assert payload["usage"]["prompt_tokens"] == len(model.encode_chat(ask(image_url(0))).ids)


@pytest.mark.parametrize("path, status, code, words", [
    ("/loop", 400, "image_fetch_failed", "redirects more than 3 times"),
    ("/to-file", 400, "invalid_image_url", "only http and https"),
    ("/big.png", 413, "image_too_large", f"limit of {MAX_IMAGE_BYTES} bytes"),
    ("/endless.png", 413, "image_too_large", f"more than {MAX_IMAGE_BYTES} bytes"),
    ("/stall.png", 400, "image_fetch_timeout", "in time"),
    ("/drip.png", 400, "image_fetch_timeout", "all 2 s"),
    ("/page.html", 400, "invalid_image", "text/html, not an image"),
    ("/fake.png", 400, "invalid_image", "not an image"),
    ("/zipped.png", 400, "invalid_image", "gzip-compressed"),
    ("/missing.png", 400, "image_fetch_failed", "HTTP 404"),
])
def test_a_remote_image_that_abuses_the_server_is_a_4xx_naming_the_part(lan_server, images, path, status, code,
                                                                        words):
    for stream in (False, True):  # a stream is refused before its first event
        start = time.monotonic()
        got, payload = post(lan_server, ask(image_url(1), f"{images.url}{path}"), stream=stream)
        assert got == status, payload
        error = payload["error"]
        assert error["param"] == "messages[0].content[1]" and error["message"].startswith("messages[0].content[1]: ")
        assert error["code"] == code and words in error["message"], error
        assert time.monotonic() - start < 4.5  # a stall or a drip costs the timeout, not the stall
    if path == "/endless.png":  # the download was cut off, not read to the end of time
        assert images.endless_stopped.wait(10)


def test_remote_images_are_refused_unless_the_server_allows_them(vision_dir, images):
    """Off by default: a 400 that says how to send the image, and no request leaves the server."""
    with running(config(vision_dir)) as url, checked(images) as asked:
        status, payload = post(url, ask(f"{images.url}/ok.png"))
    assert status == 400 and payload["error"]["code"] == "remote_image_url"
    assert "--allow-remote-images" in payload["error"]["message"] and asked == []


def test_private_addresses_are_refused_by_default_before_any_request(vision_dir, images):
    port = images.server_address[1]
    with running(config(vision_dir, allow_remote_images=True)) as url, checked(images) as asked:
        for host in ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]"):  # by address, by a name, IPv4 in IPv6
            status, payload = post(url, ask(f"http://{host}:{port}/ok.png"))
            assert status == 400, payload
            error = payload["error"]
            assert error["code"] == "image_host_refused" and error["param"] == "messages[0].content[0]"
            assert "loopback address, refused" in error["message"]
            assert "--allow-private-image-hosts" in error["message"]
    assert asked == []


@pytest.mark.parametrize("address, default, lan", [
    ("93.184.215.14", None, None),                     # public
    ("2606:4700::1111", None, None),
    ("127.0.0.1", "loopback", None),
    ("::1", "loopback", None),
    ("::ffff:10.1.2.3", "private", None),              # IPv4-mapped: judged as the IPv4 address
    ("192.168.1.20", "private", None),
    ("fd00::5", "private", None),
    ("169.254.169.254", "link-local", "link-local"),   # the cloud metadata server: never
    ("fe80::1", "link-local", "link-local"),
    ("100.64.0.1", "non-public", "non-public"),        # carrier-grade NAT: not a LAN
    ("0.0.0.0", "not a host", "not a host"),
    ("224.0.0.1", "not a host", "not a host"),
])
def test_which_addresses_a_server_fetches_from(address, default, lan):
    for allow_private, expected in ((False, default), (True, lan)):
        refusal = address_refusal(ipaddress.ip_address(address), allow_private)
        assert (refusal is None) if expected is None else (expected in refusal), (address, allow_private, refusal)
