"""backend.images: fetching task images from a real local HTTP server (Label Studio stand-in, redirects, lying
servers), local files, the SSRF and size limits, the byte cache, and decoding (bombs, broken files, modes)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import socket
import struct
import threading
import time
import warnings
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image

from backend.errors import ServiceError
from backend.images import ByteCache, ImageFetcher, content_key, is_public_address
from backend.settings import Settings

UPLOAD_TOKEN = "Token 0123456789abcdef0123456789abcdef01234567"


# ---------------------------------------------------------------------------------------------- test server


class ImageServer(ThreadingHTTPServer):
    """Serves COCO128 JPEGs and misbehaves on request; records every request's path and headers."""

    daemon_threads = True

    def __init__(self, images: Path) -> None:
        super().__init__(("127.0.0.1", 0), ImageHandler)
        self.images = images
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def count(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p == path)

    def headers_for(self, path: str) -> dict[str, str]:
        return next(h for p, h in self.requests if p == path)


class ImageHandler(BaseHTTPRequestHandler):
    server: ImageServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        with self.server.lock:
            self.server.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        path = parts.path
        if path.startswith("/coco/"):
            return self._send(200, (self.server.images / path.removeprefix("/coco/")).read_bytes())
        if path.startswith("/data/upload/"):  # like Label Studio: uploads need credentials
            if self.headers.get("Authorization") != UPLOAD_TOKEN:
                return self._send(401, b'{"detail":"Authentication credentials were not provided."}')
            return self._send(200, (self.server.images / path.rsplit("/", 1)[-1]).read_bytes())
        if path.startswith("/data/local-files"):
            return self._send(200, (self.server.images / query["d"][0]).read_bytes())
        if path == "/redirect":
            return self._redirect(query["to"][0])
        if path.startswith("/chain/"):  # /chain/N redirects N times before the image
            hops = int(path.rsplit("/", 1)[-1])
            return self._redirect(f"/chain/{hops - 1}" if hops > 1 else "/coco/000000000009.jpg")
        if path == "/huge-declared":
            return self._send(200, b"x" * 100, content_length=10**9)
        if path == "/huge-undeclared":  # no Content-Length: the body ends when the connection closes
            return self._send(200, b"x" * int(query["n"][0]), content_length=None)
        if path == "/forbidden":
            return self._send(403, b"denied")
        if path == "/text":
            return self._send(200, b"hello, not an image\n")
        if path == "/slow":
            time.sleep(1.0)
            return self._send(200, b"late")
        self._send(404, b"not found")

    def _send(self, status: int, body: bytes, content_length: int | None = -1) -> None:
        self.send_response(status)
        if content_length is not None:
            self.send_header("Content-Length", str(len(body) if content_length == -1 else content_length))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
            self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


def start(server: ThreadingHTTPServer):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def coco_images(coco128: Path) -> Path:
    return coco128 / "images"


@pytest.fixture
def server(coco_images: Path):
    srv = ImageServer(coco_images)
    start(srv)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def other_server(coco_images: Path):
    """A second origin (same loopback host, another port): a third party as far as tokens go."""
    srv = ImageServer(coco_images)
    start(srv)
    yield srv
    srv.shutdown()
    srv.server_close()


def fetcher(**overrides) -> ImageFetcher:
    return ImageFetcher(Settings(**overrides))


def trusting(**overrides) -> ImageFetcher:
    """A fetcher that may reach the loopback test servers (as if they were on SEGMASK_ALLOWED_HOSTS)."""
    return fetcher(allowed_hosts=("127.0.0.1",), **overrides)


def raises(status: int, kind: str, call, *args, **kwargs) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        call(*args, **kwargs)
    assert (info.value.status, info.value.kind) == (status, kind), info.value.message
    return info.value


JPEG = "000000000009.jpg"


# ---------------------------------------------------------------------------------------------- http fetches


def test_fetch_url_on_allowed_host_returns_the_file(server: ImageServer, coco_images: Path) -> None:
    data = trusting().fetch(f"{server.url}/coco/{JPEG}")
    assert data == (coco_images / JPEG).read_bytes()


def test_fetched_bytes_decode_to_rgb_and_key_by_their_sha1(server: ImageServer, coco_images: Path) -> None:
    images = trusting()
    data = images.fetch(f"{server.url}/coco/{JPEG}")
    image = images.decode(data)
    assert image.shape == (480, 640, 3) and image.dtype == np.uint8
    assert content_key(data) == hashlib.sha1((coco_images / JPEG).read_bytes()).hexdigest()


def test_loopback_url_is_refused_when_not_label_studio_nor_allowed(server: ImageServer) -> None:
    error = raises(403, "private_address", fetcher().fetch, f"{server.url}/coco/{JPEG}")
    assert "127.0.0.1" in error.message
    assert server.requests == []


def test_label_studio_host_may_be_private(server: ImageServer) -> None:
    assert fetcher().fetch(f"{server.url}/coco/{JPEG}", label_studio_url=server.url)


def test_allowed_host_may_be_given_with_its_port(server: ImageServer) -> None:
    host_port = server.url.removeprefix("http://")
    assert fetcher(allowed_hosts=(host_port,)).fetch(f"{server.url}/coco/{JPEG}")


def test_upload_path_is_fetched_from_label_studio_with_authorization(server: ImageServer) -> None:
    data = fetcher().fetch(f"/data/upload/1/{JPEG}", label_studio_url=server.url, authorization=UPLOAD_TOKEN)
    assert data[:2] == b"\xff\xd8"
    assert server.headers_for(f"/data/upload/1/{JPEG}")["authorization"] == UPLOAD_TOKEN


def test_upload_path_uses_settings_label_studio_url(server: ImageServer) -> None:
    data = fetcher(label_studio_url=server.url).fetch(f"/data/upload/1/{JPEG}", authorization=UPLOAD_TOKEN)
    assert data[:2] == b"\xff\xd8"


def test_label_studio_under_a_sub_path_keeps_it(server: ImageServer) -> None:
    with pytest.raises(ServiceError):  # nothing is served under /ls/: what matters is the path asked for
        fetcher().fetch(f"/data/upload/1/{JPEG}", label_studio_url=f"{server.url}/ls/", authorization="x")
    assert server.requests[0][0] == f"/ls/data/upload/1/{JPEG}"


def test_upload_path_without_label_studio_url_is_400() -> None:
    raises(400, "no_label_studio_url", fetcher().fetch, f"/data/upload/1/{JPEG}")


def test_rejected_credentials_are_422_naming_the_kind_not_the_secret(server: ImageServer) -> None:
    error = raises(
        422,
        "image_forbidden",
        fetcher().fetch,
        f"/data/upload/1/{JPEG}",
        label_studio_url=server.url,
        authorization="Bearer wrong-secret",
    )
    assert "bearer" in error.message and "wrong-secret" not in error.message


def test_forbidden_without_credentials_says_none(server: ImageServer) -> None:
    error = raises(422, "image_forbidden", trusting().fetch, f"{server.url}/forbidden")
    assert "none" in error.message


def test_token_is_not_sent_to_another_host(server: ImageServer) -> None:
    images = trusting()
    images.fetch(
        f"{server.url}/coco/{JPEG}",
        label_studio_url="http://labelstudio.invalid:8080",
        authorization=UPLOAD_TOKEN,
    )
    assert "authorization" not in server.headers_for(f"/coco/{JPEG}")


def test_token_is_not_sent_to_another_port_of_the_same_host(server: ImageServer, other_server) -> None:
    url = f"{other_server.url}/coco/{JPEG}"
    trusting().fetch(url, label_studio_url=server.url, authorization=UPLOAD_TOKEN)
    assert "authorization" not in other_server.headers_for(f"/coco/{JPEG}")


def test_label_studio_trust_covers_its_origin_not_other_ports_of_its_host(server, other_server) -> None:
    """A /setup may name any host as Label Studio's: a service on another port of that host stays private."""
    url = f"{other_server.url}/coco/{JPEG}"
    error = raises(403, "private_address", fetcher().fetch, url, label_studio_url=server.url)
    assert "127.0.0.1" in error.message
    assert other_server.requests == []


def test_label_studio_redirecting_to_another_port_of_its_host_is_403(server, other_server) -> None:
    url = f"/redirect?to={other_server.url}/coco/{JPEG}"
    raises(403, "private_address", fetcher().fetch, url, label_studio_url=server.url)
    assert other_server.requests == []


def test_token_is_dropped_when_label_studio_redirects_elsewhere(server: ImageServer, other_server) -> None:
    url = f"/redirect?to={other_server.url}/coco/{JPEG}"
    trusting().fetch(url, label_studio_url=server.url, authorization=UPLOAD_TOKEN)
    assert server.headers_for(url)["authorization"] == UPLOAD_TOKEN
    assert "authorization" not in other_server.headers_for(f"/coco/{JPEG}")


def test_token_is_not_sent_when_a_third_party_redirects_to_label_studio(server, other_server) -> None:
    trusting().fetch(
        f"{other_server.url}/redirect?to={server.url}/coco/{JPEG}",
        label_studio_url=server.url,
        authorization=UPLOAD_TOKEN,
    )
    assert "authorization" not in server.headers_for(f"/coco/{JPEG}")


# ---------------------------------------------------------------------------------------------- redirects


def test_redirect_to_the_same_server_is_followed(server: ImageServer) -> None:
    data = trusting().fetch(f"{server.url}/redirect?to=/coco/{JPEG}")
    assert data[:2] == b"\xff\xd8"
    assert server.count(f"/coco/{JPEG}") == 1


def test_three_redirects_are_followed(server: ImageServer) -> None:
    assert trusting().fetch(f"{server.url}/chain/3")


def test_a_fourth_redirect_is_422(server: ImageServer) -> None:
    error = raises(422, "image_unreachable", trusting().fetch, f"{server.url}/chain/4")
    assert "redirects" in error.message


@pytest.mark.parametrize(
    "target",
    [
        "http://10.1.2.3/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:9/x.jpg",
        "http://0.0.0.0/x.jpg",
    ],
)
def test_redirect_to_a_private_address_is_403(server: ImageServer, target: str) -> None:
    raises(403, "private_address", fetcher().fetch, f"/redirect?to={target}", label_studio_url=server.url)


def test_redirect_to_another_scheme_is_400(server: ImageServer) -> None:
    url = "/redirect?to=file:///etc/passwd"
    raises(400, "unsupported_url", fetcher().fetch, url, label_studio_url=server.url)


# ---------------------------------------------------------------------------------------------- url policy


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.jpg",
        "gopher://example.com/",
        "data:image/png;base64,iVBORw0KGgo=",
        "s3://bucket/key.jpg",
        "images/a.jpg",
    ],
)
def test_other_schemes_are_400_naming_the_scheme(url: str) -> None:
    error = raises(400, "unsupported_url", fetcher().fetch, url)
    scheme = urlsplit(url).scheme
    assert (scheme + ":") in error.message if scheme else "(none)" in error.message


def test_host_resolving_to_any_private_address_is_403(monkeypatch) -> None:
    def getaddrinfo(host, port, *args, **kwargs):
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.168.1.20", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    error = raises(403, "private_address", fetcher().fetch, "http://images.example.com/a.jpg")
    assert "192.168.1.20" in error.message


def fake_dns(monkeypatch, *answers: str) -> list[str]:
    """A DNS answering ``answers`` in turn (the last one from then on): a public address first and a private
    one later is DNS rebinding, which no server here can do, so ``getaddrinfo`` stands in. Returns the hosts
    looked up."""
    real, looked_up = socket.getaddrinfo, []

    def getaddrinfo(host, port, *args, **kwargs):
        looked_up.append(host)
        return real(answers[min(len(looked_up), len(answers)) - 1], port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


def test_a_host_rebinding_to_a_private_address_after_the_check_is_refused_unsent(
    monkeypatch, server: ImageServer
) -> None:
    port = server.server_address[1]
    looked_up = fake_dns(monkeypatch, "93.184.216.34", "127.0.0.1")
    error = raises(403, "private_address", fetcher().fetch, f"http://rebind.example.com:{port}/coco/{JPEG}")
    assert "connected to the non-public address 127.0.0.1" in error.message
    assert len(looked_up) >= 2 and server.requests == []


def test_an_allowed_host_may_connect_to_a_private_address(monkeypatch, server: ImageServer) -> None:
    port = server.server_address[1]
    fake_dns(monkeypatch, "127.0.0.1")
    data = fetcher(allowed_hosts=("rebind.example.com",)).fetch(
        f"http://rebind.example.com:{port}/coco/{JPEG}"
    )
    assert data[:2] == b"\xff\xd8"


def test_unresolvable_host_is_422(monkeypatch) -> None:
    def getaddrinfo(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    raises(422, "image_unreachable", fetcher().fetch, "http://no-such-host.example/a.jpg")


@pytest.mark.parametrize(
    "address,public",
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("10.0.0.1", False),
        ("127.0.0.1", False),
        ("169.254.169.254", False),
        ("224.0.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("::ffff:127.0.0.1", False),
        ("240.0.0.1", False),
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(address) is public


def test_connection_refused_is_422() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens on that port now
    raises(422, "image_unreachable", trusting().fetch, f"http://127.0.0.1:{port}/a.jpg")


def test_slow_server_times_out_with_422(server: ImageServer) -> None:
    images = trusting(image_timeout=0.2)
    error = raises(422, "image_unreachable", images.fetch, f"{server.url}/slow")
    assert "0.2 s" in error.message


def test_not_found_is_422_with_the_status(server: ImageServer) -> None:
    error = raises(422, "image_unreachable", trusting().fetch, f"{server.url}/nope")
    assert "404" in error.message


# ---------------------------------------------------------------------------------------------- size limits


def test_declared_content_length_over_the_limit_is_413(server: ImageServer) -> None:
    images = trusting(max_image_bytes=1000)
    raises(413, "image_too_large", images.fetch, f"{server.url}/huge-declared")


def test_undeclared_oversized_body_is_413_while_streaming(server: ImageServer) -> None:
    images = trusting(max_image_bytes=100_000)
    raises(413, "image_too_large", images.fetch, f"{server.url}/huge-undeclared?n=1000000")


def test_undeclared_body_within_the_limit_is_read(server: ImageServer) -> None:
    images = trusting(max_image_bytes=100_000)
    assert images.fetch(f"{server.url}/huge-undeclared?n=100000") == b"x" * 100_000


# ---------------------------------------------------------------------------------------------- cache


def test_second_fetch_of_a_url_comes_from_the_cache(server: ImageServer) -> None:
    images = trusting()
    url = f"{server.url}/coco/{JPEG}"
    assert images.fetch(url) == images.fetch(url)
    assert server.count(f"/coco/{JPEG}") == 1
    assert (images.hits, images.misses) == (1, 1)


def test_cache_evicts_least_recently_used_within_its_size(server: ImageServer, coco_images: Path) -> None:
    images = trusting(image_cache_mb=1)
    names = sorted(p.name for p in coco_images.glob("*.jpg"))[:12]  # about 2 MB together
    for name in names:
        images.fetch(f"{server.url}/coco/{name}")
    assert 0 < images.cache.total_bytes <= 1024 * 1024
    images.fetch(f"{server.url}/coco/{names[-1]}")  # still cached
    images.fetch(f"{server.url}/coco/{names[0]}")  # evicted: downloaded again
    assert server.count(f"/coco/{names[-1]}") == 1
    assert server.count(f"/coco/{names[0]}") == 2


def test_byte_cache_keeps_recently_used_entries() -> None:
    cache = ByteCache(max_bytes=10)
    cache.put("a", b"aaaa")
    cache.put("b", b"bbbb")
    assert cache.get("a") == b"aaaa"  # a is now the most recent
    cache.put("c", b"cccc")
    assert cache.get("b") is None and cache.get("a") == b"aaaa" and cache.get("c") == b"cccc"
    assert cache.total_bytes == 8


def test_byte_cache_does_not_keep_a_value_larger_than_itself() -> None:
    cache = ByteCache(max_bytes=10)
    cache.put("big", b"x" * 11)
    assert len(cache) == 0 and cache.total_bytes == 0


# ---------------------------------------------------------------------------------------------- local files


@pytest.fixture
def local_root(tmp_path: Path, coco_images: Path) -> Path:
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "good.jpg").write_bytes((coco_images / JPEG).read_bytes())
    (tmp_path / "secret.jpg").write_bytes(b"outside the root")
    (root / "dir" / "escape.jpg").symlink_to(tmp_path / "secret.jpg")
    return root


def test_local_file_inside_the_root_loads(local_root: Path) -> None:
    local = fetcher(local_files_root=str(local_root))
    assert local.decode(local.fetch("/data/local-files/?d=dir/good.jpg")).shape == (480, 640, 3)


@pytest.mark.parametrize("d", ["../secret.jpg", "dir/../../secret.jpg", "%2e%2e/secret.jpg"])
def test_local_path_leaving_the_root_is_403(local_root: Path, d: str) -> None:
    images = fetcher(local_files_root=str(local_root))
    raises(403, "path_traversal", images.fetch, f"/data/local-files/?d={d}")


def test_absolute_local_path_is_403(local_root: Path) -> None:
    url = f"/data/local-files/?d={local_root}/dir/good.jpg"
    raises(403, "path_traversal", fetcher(local_files_root=str(local_root)).fetch, url)


def test_symlink_leaving_the_root_is_403(local_root: Path) -> None:
    url = "/data/local-files/?d=dir/escape.jpg"
    raises(403, "path_traversal", fetcher(local_files_root=str(local_root)).fetch, url)


def test_missing_local_file_is_404(local_root: Path) -> None:
    images = fetcher(local_files_root=str(local_root))
    raises(404, "image_not_found", images.fetch, "/data/local-files/?d=dir/no.jpg")


def test_local_file_over_the_byte_limit_is_413(local_root: Path) -> None:
    images = fetcher(local_files_root=str(local_root), max_image_bytes=1000)
    raises(413, "image_too_large", images.fetch, "/data/local-files/?d=dir/good.jpg")


def test_local_files_without_a_root_come_from_label_studio(server: ImageServer) -> None:
    url = f"/data/local-files/?d={JPEG}"
    data = fetcher().fetch(url, label_studio_url=server.url, authorization=UPLOAD_TOKEN)
    assert data[:2] == b"\xff\xd8"
    assert server.headers_for(f"/data/local-files/?d={JPEG}")["authorization"] == UPLOAD_TOKEN


# ---------------------------------------------------------------------------------------------- decoding


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` 1-bit pixels, followed by garbage pixel data: decoding any pixel
    would fail, so a 413 proves the size was checked first."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def test_decompression_bomb_is_413_before_decoding() -> None:
    error = raises(413, "image_too_many_pixels", fetcher().decode, png_header(20000, 20000))
    assert "50000000" in error.message


def test_image_over_the_pixel_limit_is_413_naming_size_and_limit() -> None:
    error = raises(413, "image_too_many_pixels", fetcher().decode, png_header(8000, 8000))
    assert "8000x8000" in error.message and "50000000" in error.message


def test_pixel_limit_comes_from_settings(coco_images: Path) -> None:
    error = raises(
        413, "image_too_many_pixels", fetcher(max_image_pixels=1000).decode, (coco_images / JPEG).read_bytes()
    )
    assert "640x480" in error.message


def test_pillow_bomb_warning_made_an_error_is_still_a_413() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images = fetcher(max_image_pixels=500_000_000)  # ours would let 10000x10000 through: Pillow's warns
        raises(413, "image_too_many_pixels", images.decode, png_header(10000, 10000))


def test_truncated_jpeg_is_415(coco_images: Path) -> None:
    data = (coco_images / JPEG).read_bytes()
    raises(415, "not_an_image", fetcher().decode, data[: len(data) // 2])


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n"  # Pillow opens EPS with Ghostscript: not for us


@pytest.mark.parametrize("data", [b"hello, not an image\n", b"", EPS])
def test_non_image_bytes_are_415(data: bytes) -> None:
    raises(415, "not_an_image", fetcher().decode, data)


def test_text_served_as_an_image_is_415(server: ImageServer) -> None:
    images = trusting()
    raises(415, "not_an_image", images.decode, images.fetch(f"{server.url}/text"))


def test_exif_orientation_is_applied() -> None:
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display rotated 90 degrees clockwise
    image = fetcher().decode(encode(Image.fromarray(pixels), "JPEG", exif=exif, quality=95))
    assert image.shape == (40, 20, 3)
    assert image[:20].mean() > 200 and image[20:].mean() < 50  # the white half is now on top


@pytest.mark.parametrize("mode", ["P", "L", "1", "LA", "RGBA", "CMYK", "I;16"])
def test_any_mode_becomes_rgb_uint8(mode: str) -> None:
    source = Image.new(mode, (7, 5))
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    image = fetcher().decode(encode(source, fmt))
    assert image.shape == (5, 7, 3) and image.dtype == np.uint8


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    source = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    image = fetcher().decode(encode(source))
    assert image[0, :, 0].tolist() == [0, 128, 255]


def test_transparent_palette_image_is_rgb() -> None:
    source = Image.new("P", (4, 4), 1)
    source.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image = fetcher().decode(encode(source, transparency=0))
    assert image[0, 0].tolist() == [10, 20, 30]
