"""A small Hub-compatible HTTP server (standard library only) for testing the real `huggingface_hub` client.

Implements what create_repo / upload_folder (including its README metadata check, /api/validate-yaml) / hf_hub_download / model_info / list_repo_tree use: repo
creation (409 on repeat, with the URL), preupload, the LFS batch API and PUT, the NDJSON commit endpoint,
`resolve` with X-Repo-Commit / ETag / X-Linked-* / X-Error-Code, model info, tree listing and paths-info.
Plain LFS only (set HF_HUB_DISABLE_XET=1). Writes need `Authorization: Bearer <token>`.
`fail_next_lfs_puts` makes the next N LFS uploads drop the connection (a network failure mid-upload).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

LFS_THRESHOLD = 100_000
LFS_EXTENSIONS = (".safetensors", ".bin", ".gguf", ".pt")


class Repo:
    def __init__(self, repo_id: str, private: bool) -> None:
        self.repo_id, self.private = repo_id, private
        self.files = {}  # path -> {"data": bytes | None, "lfs": sha256 | None, "size": int}
        self.sha = hashlib.sha1(f"init:{repo_id}".encode()).hexdigest()
        self.commits = [self.sha]


class HubState:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos = {}
        self.lfs = {}  # sha256 -> bytes
        self.lock = threading.Lock()
        self.fail_next_lfs_puts = 0
        self.requests = []  # (method, path, authorization header present)


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState = None  # set by `serve`

    def log_message(self, *args):  # quiet
        pass

    # --- helpers -----------------------------------------------------------------------------------------
    def _send(self, status, body=b"", headers=None, content_type="application/json"):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status, code, message):
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.state.token}"

    def _base(self) -> str:
        return f"http://{self.headers.get('Host')}"

    def _repo(self, repo_id):
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            self._error(404 if repo is None else 401, "RepoNotFound", f"Repository Not Found for url: {self.path}")
            return None
        return repo

    # --- routing ------------------------------------------------------------------------------------------
    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        self.state.requests.append(("GET" if self.command == "GET" else "HEAD", self.path, bool(self.headers.get("Authorization"))))
        url = urlparse(self.path)
        path = unquote(url.path)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            return self._model_info(m.group(1))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if m:
            return self._tree(m.group(1), m.group(3) or "")
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._resolve(m.group(1), m.group(2), m.group(3))
        if path == "/api/whoami-v2":
            if not self._authorized():
                return self._error(401, "Unauthorized", "Invalid credentials")
            return self._send(200, {"type": "user", "name": "tester", "auth": {"type": "access_token"}})
        self._error(404, "NotFound", f"no route for GET {path}")

    def do_POST(self):
        self.state.requests.append(("POST", self.path, bool(self.headers.get("Authorization"))))
        path = unquote(urlparse(self.path).path)
        body = self._body()
        if not self._authorized():
            return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if path == "/api/repos/create":
            return self._create(json.loads(body or b"{}"))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path)
        if m:
            return self._preupload(m.group(1), json.loads(body))
        m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if m:
            return self._lfs_batch(m.group(1), json.loads(body))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path)
        if m:
            return self._commit(m.group(1), body)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/paths-info/([^/]+)", path)
        if m:
            paths = parse_qs(body.decode()).get("paths") or json.loads(body or b"{}").get("paths", [])
            return self._paths_info(m.group(1), paths)
        self._error(404, "NotFound", f"no route for POST {path}")

    def do_PUT(self):
        self.state.requests.append(("PUT", self.path, bool(self.headers.get("Authorization"))))
        m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", urlparse(self.path).path)
        if not m:
            return self._error(404, "NotFound", "no route")
        with self.state.lock:
            fail = self.state.fail_next_lfs_puts > 0
            if fail:
                self.state.fail_next_lfs_puts -= 1
        if fail:  # simulate a network failure: read part of the body, then drop the connection
            self.rfile.read(min(1024, int(self.headers.get("Content-Length") or 0)))
            self.close_connection = True
            self.connection.shutdown(2)
            return
        data = self._body()
        if hashlib.sha256(data).hexdigest() != m.group(1):
            return self._error(400, "BadRequest", "sha256 mismatch")
        self.state.lfs[m.group(1)] = data
        self._send(200, {})

    # --- endpoints ----------------------------------------------------------------------------------------
    def _create(self, payload):
        repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
        url = f"{self._base()}/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url},
                                  {"X-Error-Message": "You already created this model repo"})
            private = payload.get("private") or payload.get("visibility") == "private"
            self.state.repos[repo_id] = Repo(repo_id, bool(private))
        self._send(200, {"url": url, "name": repo_id})

    def _validate_yaml(self, payload):
        import yaml  # PyYAML, a dependency of huggingface_hub

        content = payload.get("content") or ""
        front = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        try:
            meta = yaml.safe_load(front.group(1) if front else "") or {}
            if not isinstance(meta, dict):
                raise ValueError("metadata must be a mapping")
        except Exception as exc:
            return self._send(400, {"error": f"Invalid metadata in README.md: {exc}"}, {"X-Error-Message": "Invalid metadata"})
        self._send(200, {"errors": [], "warnings": []})

    def _model_info(self, repo_id):
        repo = self._repo(repo_id)
        if repo:
            self._send(200, {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": repo.private,
                             "siblings": [{"rfilename": p} for p in sorted(repo.files)], "tags": [], "downloads": 0,
                             "likes": 0, "lastModified": "2026-11-22T00:00:00.000Z"})

    def _entry(self, path, f):
        entry = {"type": "file", "path": path, "size": f["size"], "oid": _git_blob_sha(f["data"] or f["lfs"].encode())}
        if f["lfs"]:
            entry["lfs"] = {"oid": f["lfs"], "size": f["size"], "pointerSize": 134}
        return entry

    def _tree(self, repo_id, prefix):
        repo = self._repo(repo_id)
        if repo is None:
            return
        prefix = prefix.strip("/")
        entries = [self._entry(p, f) for p, f in sorted(repo.files.items()) if not prefix or p.startswith(prefix + "/")]
        if prefix and not entries:
            return self._error(404, "EntryNotFound", f"{prefix} does not exist on main")
        self._send(200, entries)

    def _paths_info(self, repo_id, paths):
        repo = self._repo(repo_id)
        if repo:
            self._send(200, [self._entry(p, repo.files[p]) for p in paths if p in repo.files])

    def _resolve(self, repo_id, revision, filename):
        repo = self._repo(repo_id)
        if repo is None:
            return
        if revision not in ("main", repo.sha):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        f = repo.files.get(filename)
        if f is None:
            return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha,
                                                                 "X-Error-Message": "Entry not found"})
        headers = {"X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes"}
        if f["lfs"]:
            data = self.state.lfs[f["lfs"]]
            headers.update({"ETag": f'"{_git_blob_sha(f["lfs"].encode())}"', "X-Linked-Etag": f'"{f["lfs"]}"',
                            "X-Linked-Size": str(f["size"])})
        else:
            data = f["data"]
            headers["ETag"] = f'"{_git_blob_sha(data)}"'
        self._send(200, data, headers, content_type="application/octet-stream")

    def _preupload(self, repo_id, payload):
        if self._repo(repo_id) is None:
            return
        files = []
        for f in payload["files"]:
            lfs = f["size"] >= LFS_THRESHOLD or f["path"].endswith(LFS_EXTENSIONS)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        self._send(200, {"files": files, "commitOid": self.state.repos[repo_id].sha})

    def _lfs_batch(self, repo_id, payload):
        if self._repo(repo_id) is None:
            return
        objects = []
        for obj in payload.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.lfs:
                entry["actions"] = {"upload": {"href": f"{self._base()}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _commit(self, repo_id, body):
        repo = self._repo(repo_id)
        if repo is None:
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        changes = {}
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode()
                changes[value["path"]] = {"data": data, "lfs": None, "size": len(data)}
            elif key == "lfsFile":
                if value["oid"] not in self.state.lfs:
                    return self._error(422, "LfsObjectMissing", f"LFS object {value['oid']} was never uploaded")
                changes[value["path"]] = {"data": None, "lfs": value["oid"], "size": value["size"]}
            elif key == "deletedFile":
                changes[value["path"]] = None
        with self.state.lock:
            for path, f in changes.items():
                if f is None:
                    repo.files.pop(path, None)
                else:
                    repo.files[path] = f
            repo.sha = hashlib.sha1((repo.sha + json.dumps(sorted(changes))).encode()).hexdigest()
            repo.commits.append(repo.sha)
        self._send(200, {"commitUrl": f"{self._base()}/{repo_id}/commit/{repo.sha}", "commitOid": repo.sha,
                         "success": True, "pullRequestUrl": None})


def serve(token: str):
    """Start the server on 127.0.0.1 (a free port) in a thread; returns (url, state, shutdown)."""
    state = HubState(token)
    handler = type("BoundHandler", (Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"

    def shutdown():
        httpd.shutdown()
        httpd.server_close()

    return url, state, shutdown
