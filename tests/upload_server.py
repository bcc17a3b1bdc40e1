"""A real HTTP server standing in for Label Studio's file serving in backend tests."""

from __future__ import annotations

from pathlib import Path

UPLOAD_TOKEN = "0123456789abcdef0123456789abcdef01234567"


class UploadServer:
    """A real HTTP server that serves COCO128 images the way Label Studio serves uploads:
    ``GET /data/upload/1/<file name>`` with ``Authorization: Token <UPLOAD_TOKEN>``, else 401."""

    def __init__(self, images: Path) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        server = self
        self.requests: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                server.requests.append(self.path)
                name = self.path.removeprefix("/data/upload/1/")
                if self.headers.get("Authorization") != f"Token {UPLOAD_TOKEN}":
                    self.send_error(401, "authentication required")
                    return
                path = images / name
                if "/" in name or not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
