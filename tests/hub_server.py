"""A local HTTP server speaking the part of the Hugging Face Hub protocol that `create_repo`, `upload_folder` /
`push_to_hub` and `hf_hub_download` / `from_pretrained` use (standard library only, in-memory, one branch `main`).

Endpoints (see shared/docs/environment_notes.md): POST /api/repos/create, POST /api/validate-yaml,
POST /api/models/{repo}/preupload/main, POST /{repo}.git/info/lfs/objects/batch + PUT /lfs-upload/{oid},
POST /api/models/{repo}/commit/main (NDJSON), GET /api/models/{repo}[/revision/{rev}|/tree/{rev}],
HEAD/GET /{repo}/resolve/{rev}/{path} (ETag, X-Repo-Commit; 404 + X-Error-Code when absent).

Use the `hub_server` fixture; `server.env()` is the environment for a subprocess talking to it (huggingface_hub
reads HF_ENDPOINT at import time, so the client must run in a fresh process).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".model")
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


@dataclass
class Repo:
    private: bool = False
    files: dict[str, bytes] = field(default_factory=dict)  # path -> content at the head of main
    lfs: set[str] = field(default_factory=set)  # paths stored through LFS
    commits: list[dict] = field(default_factory=list)  # {"oid", "summary", "paths"}

    @property
    def sha(self) -> str:
        return self.commits[-1]["oid"] if self.commits else "0" * 40


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LocalHub

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().strip().split(b";")[0], 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None, head: bool = False):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _not_found(self, code: str, head: bool = False):
        self._send(404, {"error": code}, {"X-Error-Code": code, "X-Error-Message": code}, head=head)

    # -------------------------------------------------------------------------------------------------- routes
    def do_POST(self):
        hub, path, body = self.server, self.path.split("?")[0], self._body()
        self.server.requests.append(("POST", path))
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
            url = {"url": f"{hub.url}/{repo_id}", "name": repo_id}
            if repo_id in hub.repos:
                return self._send(409, {"error": "You already created this model repo", **url})
            hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
            return self._send(200, url)
        if path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if m := re.fullmatch(rf"/api/models/{REPO}/preupload/main", path):
            if m["repo"] not in hub.repos:
                return self._not_found("RepoNotFound")
            files = [
                {"path": f["path"], "uploadMode": "lfs" if self._is_lfs(f) else "regular", "shouldIgnore": False}
                for f in json.loads(body)["files"]
            ]
            return self._send(200, {"files": files})
        if m := re.fullmatch(rf"/{REPO}\.git/info/lfs/objects/batch", path):
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.lfs_objects:  # already stored objects need no upload
                    entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}"}}
                objects.append(entry)
            return self._send(200, {"transfer": "basic", "objects": objects})
        if m := re.fullmatch(rf"/api/models/{REPO}/commit/main", path):
            return self._commit(m["repo"], body)
        return self._not_found("NotFound")

    def do_PUT(self):
        self.server.requests.append(("PUT", self.path))
        body = self._body()
        if m := re.fullmatch(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self.path):
            if hashlib.sha256(body).hexdigest() != m["oid"]:
                return self._send(400, {"error": "sha256 mismatch"})
            self.server.lfs_objects[m["oid"]] = body
            return self._send(200)
        return self._not_found("NotFound")

    def do_HEAD(self):
        self._get(head=True)

    def do_GET(self):
        self._get(head=False)

    # ------------------------------------------------------------------------------------------------- helpers
    def _is_lfs(self, file: dict) -> bool:
        return file["path"].endswith(LFS_SUFFIXES) or file.get("size", 0) > 10_000_000

    def _commit(self, repo_id: str, body: bytes):
        hub = self.server
        if repo_id not in hub.repos:
            return self._not_found("RepoNotFound")
        repo = hub.repos[repo_id]
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        files, lfs = dict(repo.files), set(repo.lfs)
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs.discard(value["path"])
            elif key == "lfsFile":
                if value["oid"] not in hub.lfs_objects:
                    return self._send(422, {"error": f"LFS object {value['oid']} was never uploaded"})
                files[value["path"]] = hub.lfs_objects[value["oid"]]
                lfs.add(value["path"])
            elif key in ("deletedFile", "deletedFolder"):
                for path in [p for p in files if p == value["path"] or p.startswith(value["path"].rstrip("/") + "/")]:
                    files.pop(path)
        oid = hashlib.sha1(f"{repo.sha}{sorted(files)}{header['summary']}".encode()).hexdigest()
        repo.files, repo.lfs = files, lfs
        repo.commits.append(
            {"oid": oid, "summary": header["summary"], "paths": [i["value"]["path"] for i in lines[1:]]}
        )
        return self._send(
            200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
        )

    def _get(self, head: bool):
        hub, path = self.server, self.path.split("?")[0]
        self.server.requests.append(("HEAD" if head else "GET", path))
        if m := re.fullmatch(rf"/api/models/{REPO}(/revision/[^/]+)?", path):
            repo = hub.repos.get(m["repo"])
            if repo is None:
                return self._not_found("RepoNotFound", head)
            return self._send(
                200,
                {
                    "id": m["repo"],
                    "modelId": m["repo"],
                    "sha": repo.sha,
                    "private": repo.private,
                    "tags": [],
                    "siblings": [{"rfilename": p} for p in sorted(repo.files)],
                },
                head=head,
            )
        if m := re.fullmatch(rf"/api/models/{REPO}/tree/[^/]+(/.*)?", path):
            repo = hub.repos.get(m["repo"])
            if repo is None:
                return self._not_found("RepoNotFound", head)
            tree = [
                {"type": "file", "path": p, "size": len(c), "oid": hashlib.sha1(c).hexdigest()}
                for p, c in sorted(repo.files.items())
            ]
            return self._send(200, tree, head=head)
        if m := re.fullmatch(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path):
            repo = hub.repos.get(m["repo"])
            if repo is None:
                return self._not_found("RepoNotFound", head)
            if m["rev"] not in ("main", repo.sha):
                return self._not_found("RevisionNotFound", head)
            content = repo.files.get(m["file"])
            if content is None:
                return self._send(
                    404,
                    {"error": "EntryNotFound"},
                    {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha},
                    head=head,
                )
            etag = hashlib.sha256(content).hexdigest() if m["file"] in repo.lfs else hashlib.sha1(content).hexdigest()
            headers = {"ETag": f'"{etag}"', "X-Repo-Commit": repo.sha, "Content-Type": "application/octet-stream"}
            if m["file"] in repo.lfs:
                headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(content))})
            return self._send(200, content, headers, head=head)
        return self._not_found("NotFound", head)


class LocalHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []

    def env(self, hf_home: str | os.PathLike) -> dict[str, str]:
        """Environment for a client subprocess: this endpoint, a token, no Xet, online, its own cache."""
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env.update(
            HF_ENDPOINT=self.url,
            HF_TOKEN="hf_local_test_token",
            HF_HUB_DISABLE_XET="1",
            HF_HOME=str(hf_home),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_ETAG_TIMEOUT="30",
        )
        return env


@pytest.fixture
def hub_server():
    """A fresh in-memory local Hub for one test; `hub_server.url`, `.repos`, `.env(hf_home)`."""
    server = LocalHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
