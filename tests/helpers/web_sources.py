"""Local HTTP servers on 127.0.0.1 standing for the web sources of adapters, for tests.

- `FolderServer(root)`: a plain web folder (http.server's own handler: Content-Length, Last-Modified,
  HEAD), as a CDN or nginx would serve `https://host/path/<name>/<file>`;
- `HubServer(root)`: the Hugging Face Hub's file endpoints as huggingface_hub calls them,
  `/{org}/{name}/resolve/{revision}/{file}`, over folders `root/<org>/<name>/<revision>/<file>`: HEAD and
  GET with `X-Repo-Commit` (the revision's commit sha), `ETag` and `Content-Length`, and the Hub's
  404s (`X-Error-Code: RepoNotFound` / `EntryNotFound`). It records each request's Authorization header.

Both count the GETs per path (`gets`), from the server's side.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


class _Server:
    def __init__(self, handler) -> None:
        self.gets: Counter[str] = Counter()
        self.auth: list[str | None] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _FolderHandler(_Quiet):
    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self.server.owner.gets[urlsplit(self.path).path] += 1  # type: ignore[attr-defined]
        super().do_GET()

    def copyfile(self, source, outputfile) -> None:  # noqa: ANN001 (http.server's signature)
        delay = self.server.owner.delay_s  # type: ignore[attr-defined]
        if not delay:
            super().copyfile(source, outputfile)
            return
        while chunk := source.read(4096):  # a slow link: a pause between small pieces
            outputfile.write(chunk)
            outputfile.flush()
            time.sleep(delay)


class FolderServer(_Server):
    """A web folder over `root`; `delay_s` pauses between 4 KiB pieces of a body (a slow source)."""

    def __init__(self, root: Path, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        super().__init__(partial(_FolderHandler, directory=str(root)))


class _HubHandler(_Quiet):
    root: Path

    def _resolve(self, head: bool) -> None:
        owner = self.server.owner  # type: ignore[attr-defined]
        owner.auth.append(self.headers.get("authorization"))
        parts = unquote(urlsplit(self.path).path).strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            self.send_error(404)
            return
        org, name, revision, filename = parts[0], parts[1], parts[3], "/".join(parts[4:])
        repo = owner.root / org / name
        if not repo.is_dir():
            self._hub_404("RepoNotFound")
            return
        # a revision is a branch folder, or the commit sha the Hub answered for it
        folder = next((p for p in repo.iterdir() if p.name == revision or owner.commit(p) == revision), None)
        if folder is None:
            self._hub_404("RevisionNotFound")
            return
        path = folder / filename
        if not path.is_file():
            self._hub_404("EntryNotFound")
            return
        data = path.read_bytes()
        if not head:
            owner.gets[f"{org}/{name}/{filename}"] += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
        self.send_header("X-Repo-Commit", owner.commit(folder))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _hub_404(self, code: str) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802
        self._resolve(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._resolve(head=False)


class HubServer(_Server):
    """The Hub's resolve endpoints over `root/<org>/<name>/<revision>/<file>`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        super().__init__(_HubHandler)

    @staticmethod
    def commit(folder: Path) -> str:
        """A revision folder's commit sha: a hash of its files (a new push changes it)."""
        h = hashlib.sha1()
        for path in sorted(folder.iterdir()):
            h.update(path.name.encode() + path.read_bytes())
        return h.hexdigest()
