"""A local HTTP endpoint that serves one repository's files the way the Hugging Face hub's HTTP API does
(``HF_ENDPOINT`` points huggingface_hub at it): the repository-info call that lists the files, and file
downloads with ETag / X-Repo-Commit headers and byte ranges. It records every request, so a test can
tell which bytes were read. Nothing in the package under test is replaced: huggingface_hub's own client
talks to it over HTTP.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class HubServer:
    def __init__(self, repo_id: str, folder: Path, commit: str = "a" * 40) -> None:
        self.repo_id, self.folder, self.commit = repo_id, folder, commit
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                server._answer(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                server._answer(self, body=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.folder)) for p in self.folder.rglob("*") if p.is_file())

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append((h.command, path, h.headers.get("Range")))
        info_prefix = f"/api/models/{self.repo_id}"
        file_prefix = f"/{self.repo_id}/resolve/"
        if path.startswith(info_prefix + "/tree/"):  # list_repo_tree (huggingface_hub 1.x and later)
            entries = [
                {"type": "file", "path": f, "size": (self.folder / f).stat().st_size, "oid": hashlib.sha1(
                    (self.folder / f).read_bytes()).hexdigest()}
                for f in self.files()
            ]  # fmt: skip
            self._send(h, 200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, body)
            return
        if path.startswith(info_prefix):
            data = json.dumps(
                {"id": self.repo_id, "sha": self.commit, "siblings": [{"rfilename": f} for f in self.files()]}
            ).encode()
            self._send(h, 200, data, {"Content-Type": "application/json"}, body)
            return
        if path.startswith(file_prefix):
            name = path[len(file_prefix) :].split("/", 1)[1]
            target = self.folder / name
            if not target.is_file() or ".." in Path(name).parts:
                self._send(h, 404, b"", {"X-Error-Code": "EntryNotFound"}, body)
                return
            data = target.read_bytes()
            headers = {
                "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "X-Repo-Commit": self.commit,
                "Accept-Ranges": "bytes",
            }
            status, rng = 200, h.headers.get("Range")
            if rng and rng.startswith("bytes="):
                start_s, _, end_s = rng[len("bytes=") :].partition("-")
                start, end = int(start_s), min(int(end_s) if end_s else len(data) - 1, len(data) - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, status = data[start : end + 1], 206
            self._send(h, status, data, headers, body)
            return
        self._send(h, 404, b"", {"X-Error-Code": "RepoNotFound"}, body)

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str], body: bool
    ) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def bytes_read(self, filename: str) -> int:
        """Bytes of ``filename`` sent by GET requests (a ranged GET counts its range)."""
        total = 0
        size = (self.folder / filename).stat().st_size
        for method, path, rng in self.requests:
            if method != "GET" or not path.endswith("/" + filename):
                continue
            if rng and rng.startswith("bytes="):
                start_s, _, end_s = rng[len("bytes=") :].partition("-")
                total += min(int(end_s) if end_s else size - 1, size - 1) - int(start_s) + 1
            else:
                total += size
        return total
