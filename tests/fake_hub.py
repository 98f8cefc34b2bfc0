"""A local HTTP server answering the few Hugging Face Hub endpoints that ``peftmm push`` and
``hf://`` pulls use (huggingface_hub's create_repo, create_branch, upload_folder, snapshot_download),
for tests: point ``HF_ENDPOINT`` at :attr:`FakeHub.url`.

Repositories live in memory: ``{repo: {"private", "branches": {name: sha}, "commits": {sha: {path:
bytes}}}}``. Writes need ``Authorization: Bearer <token>`` with the server's token; a private
repository is invisible (404 ``RepoNotFound``, as the Hub answers) without it. Every file is
uploaded inline ("regular" upload mode), so no LFS or Xet storage is involved. Requests are
recorded in :attr:`FakeHub.requests` as ``(method, path)``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml

TOKEN = "hf_fake_write_token"
_REPO = r"(?P<repo>[^/]+/[^/]+)"


class FakeHub:
    def __init__(self, token: str = TOKEN):
        self.token = token
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.front_matter: list[dict] = []   # of every model card validated
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo: str, revision: str = "main") -> dict[str, bytes]:
        entry = self.repos[repo]
        return entry["commits"][entry["branches"].get(revision, revision)]


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):   # quiet
            pass

        # ------------------------------------------------------------ plumbing
        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None,
                  head: bool = False):
            data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def _authorised(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {hub.token}"

        def _repo(self, repo: str, head: bool = False):
            entry = hub.repos.get(repo)
            if entry is None or (entry["private"] and not self._authorised()):
                self._send(401 if not self._authorised() else 404, {"error": "Repository not found"},
                           {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, head=head)
                return None
            return entry

        def _sha(self, entry: dict, revision: str, head: bool = False):
            revision = unquote(revision)
            sha = entry["branches"].get(revision, revision if revision in entry["commits"] else None)
            if sha is None:
                self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound",
                                                              "X-Error-Message": "Invalid rev id"}, head=head)
            return sha

        # ------------------------------------------------------------ routes
        def do_HEAD(self):
            self._get(head=True)

        def do_GET(self):
            self._get(head=False)

        def _get(self, head: bool):
            path = urlparse(self.path).path
            hub.requests.append((self.command, path))
            if path == "/api/agent-harnesses":   # huggingface_hub asks this once; nothing to report
                return self._send(200, {"standardEnvVars": [], "harnesses": {}}, head=head)
            m = re.fullmatch(rf"/api/models/{_REPO}(?:/revision/(?P<rev>.+))?", path)
            if m:
                entry = self._repo(m["repo"], head)
                if entry is None:
                    return
                sha = self._sha(entry, m["rev"] or "main", head)
                if sha is None:
                    return
                files = entry["commits"][sha]
                return self._send(200, {"id": m["repo"], "modelId": m["repo"], "sha": sha, "private": entry["private"],
                                        "siblings": [{"rfilename": f} for f in sorted(files)]}, head=head)
            m = re.fullmatch(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", path)
            if m:
                entry = self._repo(m["repo"], head)
                sha = entry and self._sha(entry, m["rev"], head)
                if sha is None:
                    return
                files = entry["commits"][sha]
                return self._send(200, [{"type": "file", "path": f, "size": len(b),
                                         "oid": hashlib.sha1(b).hexdigest()} for f, b in sorted(files.items())],
                                  head=head)
            m = re.fullmatch(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
            if m:
                entry = self._repo(m["repo"], head)
                sha = entry and self._sha(entry, m["rev"], head)
                if sha is None:
                    return
                data = entry["commits"][sha].get(unquote(m["file"]))
                if data is None:
                    return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}, head=head)
                etag = f'"{hashlib.sha1(data).hexdigest()}"'
                return self._send(200, raw=data, head=head, headers={"X-Repo-Commit": sha, "ETag": etag})
            self._send(404, {"error": f"not answered by the fake hub: GET {path}"})

        def do_POST(self):
            path = urlparse(self.path).path
            hub.requests.append(("POST", path))
            body = self._body()
            if not self._authorised():
                return self._send(401, {"error": "Invalid credentials in Authorization header"})
            if path == "/api/validate-yaml":   # upload_folder sends the model card's front matter first
                try:
                    content = json.loads(body)["content"]   # the whole README: its front matter is checked
                    if content.startswith("---"):
                        front = yaml.safe_load(content.split("---", 2)[1])
                        assert isinstance(front, dict), "the front matter is not a mapping"
                        hub.front_matter.append(front)
                except (yaml.YAMLError, KeyError, ValueError, IndexError, AssertionError) as e:
                    return self._send(400, {"error": f"invalid YAML: {e}"})
                return self._send(200, {"errors": [], "warnings": []})
            if path == "/api/repos/create":
                request = json.loads(body)
                repo = f"{request.get('organization') or 'user'}/{request['name']}"
                with hub.lock:
                    if repo in hub.repos:
                        return self._send(409, {"error": "You already created this model repo", "url": repo})
                    private = request.get("visibility") == "private" or bool(request.get("private"))
                    hub.repos[repo] = {"private": private, "branches": {"main": "0" * 40},
                                       "commits": {"0" * 40: {}}}
                return self._send(200, {"url": f"{hub.url}/{repo}", "name": repo})
            m = re.fullmatch(rf"/api/models/{_REPO}/branch/(?P<branch>.+)", path)
            if m:
                entry = self._repo(m["repo"])
                if entry is None:
                    return
                branch = unquote(m["branch"])
                if branch in entry["branches"]:
                    return self._send(409, {"error": "Reference already exists"})
                entry["branches"][branch] = entry["branches"]["main"]
                return self._send(200, {})
            m = re.fullmatch(rf"/api/models/{_REPO}/preupload/(?P<rev>.+)", path)
            if m:
                if self._repo(m["repo"]) is None:
                    return
                files = json.loads(body)["files"]
                return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
            m = re.fullmatch(rf"/api/models/{_REPO}/commit/(?P<rev>.+)", path)
            if m:
                entry = self._repo(m["repo"])
                sha = entry and self._sha(entry, m["rev"])
                if sha is None:
                    return
                files = dict(entry["commits"][sha])
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        files.pop(item["value"]["path"], None)
                new = hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items()))
                                   .encode() + sha.encode()).hexdigest()
                entry["commits"][new] = files
                entry["branches"][unquote(m["rev"])] = new
                return self._send(200, {"commitUrl": f"{hub.url}/{m['repo']}/commit/{new}", "commitOid": new,
                                        "pullRequestUrl": None})
            self._send(404, {"error": f"not answered by the fake hub: POST {path}"})

    return Handler
