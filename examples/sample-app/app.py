"""A tiny web app the factory works on: a greeting page and a JSON health check."""

from __future__ import annotations

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def greeting(name: str) -> str:
    return f"Hello, {name}!"


PAGE = """<!doctype html>
<html><head><title>Sample app</title>
<style>body{{font-family:sans-serif;margin:3rem;background:#f6f7f9}}h1{{color:#1f6feb}}</style>
</head><body><h1>{title}</h1><p>Served from the Shopfloor sample repo.</p>
<ul><li><a href="/about">About</a></li><li><a href="/health">Health</a></li></ul>
</body></html>"""


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/health":
            body, kind = json.dumps({"status": "ok"}).encode(), "application/json"
        elif self.path in ("/", "/about"):
            title = greeting("factory") if self.path == "/" else "About the sample app"
            body, kind = PAGE.format(title=title).encode(), "text/html; charset=utf-8"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return


def main() -> None:
    port = int(os.environ.get("PORT", "8000"))
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
