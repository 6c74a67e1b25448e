"""A loopback Hugging Face Hub: a small HTTP server speaking the calls huggingface_hub
makes, so `prime push` and `prime pull --source hub` run for real without the network.
Shared by the tests (pytest.ini puts this folder on the path).

Uploads (`create_repo`, `upload_folder`: repo creation, model-card validation,
preupload, commit) land under `root`. Every file is offered as a regular (non-LFS)
upload, so the Hub's LFS/Xet storage path is not exercised.

Downloads (`snapshot_download`: revision info, the tree listing, HEAD and GET of each
file) are served from `repos`: repo id -> commit sha -> {path: bytes}; the branch `main`
is the last commit added. A revision the repository does not have is a 404 with the
Hub's `RevisionNotFound` error code. A repository in `gated` answers as the Hub answers
a gated one: 401 `GatedRepo` without a token, 403 with a token not in `accepted` (its
owner has not accepted the license).
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit


class LoopbackHub(http.server.BaseHTTPRequestHandler):
    root: Path
    calls: list[str] = []
    repos: dict[str, dict[str, dict[str, bytes]]] = {}
    gated: set[str] = set()
    accepted: set[str] = set()  # tokens ("Bearer hf_...") whose account accepted the gated licenses

    def _reply(self, payload, status: int = 200, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # -- uploads ---------------------------------------------------------------------------

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.calls.append(f"POST {self.path.split('?')[0]} auth={self.headers.get('Authorization')}")
        if self.path.startswith("/api/repos/create"):
            repo = json.loads(body)
            host = f"http://127.0.0.1:{self.server.server_port}"
            return self._reply({"url": f"{host}/{repo.get('organization') or 'me'}/{repo['name']}"})
        if self.path.startswith("/api/validate-yaml"):  # the model card's metadata block
            return self._reply({"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                          for f in files]})
        if "/commit/" in self.path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    target = self.root / item["value"]["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(item["value"]["content"]))
            host = f"http://127.0.0.1:{self.server.server_port}"
            return self._reply({"commitUrl": f"{host}/me/tiny-jarvis/commit/{'a' * 40}", "commitOid": "a" * 40})
        return self._reply({"error": "not found"}, 404)

    # -- downloads -------------------------------------------------------------------------

    def do_GET(self):  # noqa: N802
        path = unquote(urlsplit(self.path).path)
        self.calls.append(f"{self.command} {path}")
        api = path.startswith("/api/models/")
        parts = path.removeprefix("/api/models/" if api else "/").split("/")
        if len(parts) >= 4 and api:  # <owner>/<name>/{revision,tree}/<revision>
            return self._api(f"{parts[0]}/{parts[1]}", parts[2], parts[3])
        if len(parts) >= 5 and parts[2] == "resolve":  # <owner>/<name>/resolve/<revision>/<file>
            return self._file(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        return self._reply({"error": "not found"}, 404)

    do_HEAD = do_GET

    def _refused(self, repo_id: str) -> bool:
        """A gated repository without an accepted token: answered as the Hub does, True."""
        if repo_id not in self.gated:
            return False
        token = self.headers.get("Authorization")
        if token in self.accepted:
            return False
        status = 401 if token is None else 403
        message = (f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to "
                   "access it. Please log in.") if status == 401 else f"Access to model {repo_id} is restricted."
        self._reply({"error": message}, status, {"X-Error-Code": "GatedRepo", "X-Error-Message": message})
        return True

    def _commit(self, repo_id: str, revision: str) -> str | None:
        commits = self.repos.get(repo_id, {})
        if revision == "main" and commits:
            return list(commits)[-1]
        return revision if revision in commits else None

    def _missing_revision(self, repo_id: str, revision: str) -> None:
        self._reply({"error": f"Invalid rev id: {revision}"}, 404, {"X-Error-Code": "RevisionNotFound"})

    def _api(self, repo_id: str, kind: str, revision: str) -> None:
        if self._refused(repo_id):
            return None
        commit = self._commit(repo_id, revision)
        if commit is None:
            return self._missing_revision(repo_id, revision)
        files = self.repos[repo_id][commit]
        if kind == "revision":
            return self._reply({"id": repo_id, "sha": commit, "siblings": [{"rfilename": p} for p in files]})
        if kind == "tree":
            return self._reply([{"type": "file", "path": p, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                                for p, data in files.items()])
        return self._reply({"error": "not found"}, 404)

    def _file(self, repo_id: str, revision: str, rel: str) -> None:
        if self._refused(repo_id):
            return None
        commit = self._commit(repo_id, revision)
        if commit is None:
            return self._missing_revision(repo_id, revision)
        data = self.repos[repo_id][commit].get(rel)
        if data is None:
            return self._reply({"error": "entry not found"}, 404, {"X-Error-Code": "EntryNotFound"})
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextmanager
def running(handler: type[LoopbackHub]) -> Iterator[str]:
    """The hub on a free loopback port for the block; yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def hub_for_tests(monkeypatch, tmp_path: Path) -> Iterator[type[LoopbackHub]]:
    """A fresh loopback Hub that huggingface_hub talks to for one test: online for it (the
    test session is offline), its own download cache. Put repositories in `.repos`, gate
    them with `.gated`, read the requests in `.calls`."""
    import huggingface_hub.constants as constants

    handler = type("Hub", (LoopbackHub,), {"root": tmp_path / "uploads", "calls": [], "repos": {}, "gated": set(),
                                           "accepted": set()})
    with running(handler) as endpoint:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the session is offline; loopback is fine
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        yield handler
