"""The hub path of backbones.py, tested offline against a local server that answers as the Hugging Face hub does.

huggingface_hub reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` once, when it is imported, so every check of what a
real run would do happens in a subprocess whose environment is set before anything is imported. The test process
itself has ``LESIONLAB_OFFLINE=1`` (conftest); the subprocesses drop it.

The fake hub answers like huggingface.co for a file stored in LFS: ``HEAD /<repo>/resolve/<revision>/<file>`` gives
a 302 to a CDN host, with ``X-Repo-Commit``, ``X-Linked-Etag`` (the file's sha256) and ``X-Linked-Size``; the CDN
(a second server, so it is another origin as the real CDN is) serves the bytes. A file the repo lacks gets
404 with ``X-Error-Code: EntryNotFound``, an unknown repo 401 with ``RepoNotFound``. Every request is logged, and the
log is part of every failure message.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch

from lesionlab.models.backbones import endpoint_address, get_spec, hub_reachable, tensors_sha256

REPO_ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "efficientnetv2b0"  # the smallest of the three study backbones that only the hub has weights for
TIMM_NAME = get_spec(BACKBONE).timm_name
HUB_REPO = "timm/tf_efficientnetv2_b0.in1k"  # timm's pretrained cfg names this repo (hf_hub_id)
WEIGHTS_FILE = "model.safetensors"  # what timm's load_state_dict_from_hf asks for first
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the hub answers with a 40-hex commit id

# Variables of the test process that must not reach a subprocess: the offline switches (the point is to go
# online), a token, caches of the user, and proxies (the fake hub is on 127.0.0.1).
_DROP = (
    "LESIONLAB_OFFLINE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_ENDPOINT",
    "HF_TOKEN",
    "HF_HUB_CACHE",
    "HF_HOME",
    "HUGGINGFACE_HUB_CACHE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


def hub_env(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    """The environment of a subprocess that talks to ``endpoint`` with empty, private caches and weights folder."""
    env = {k: v for k, v in os.environ.items() if k not in _DROP}
    for d in ("hf-home", "hf-cache", "weights"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_CACHE=str(tmp_path / "hf-cache"),
        LESIONLAB_WEIGHTS_DIR=str(tmp_path / "weights"),  # empty: no local file may be found
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    env.update(extra)
    return env


@dataclass
class FakeHub:
    """A hub and its CDN on two local ports, serving ``files`` of one repo at one commit."""

    files: dict[str, bytes]
    repo: str = HUB_REPO
    commit: str = COMMIT
    requests: list[str] = field(default_factory=list)  # "hub HEAD /path", "cdn GET /path", in order
    endpoint: str = ""
    cdn: str = ""

    def log(self) -> str:
        return "requests the fake hub saw:\n  " + ("\n  ".join(self.requests) or "(none)")


def _handler(hub: FakeHub, role: str) -> type[BaseHTTPRequestHandler]:
    resolve = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
    blobs = {hashlib.sha256(b).hexdigest(): b for b in hub.files.values()}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # the request log below replaces stderr noise
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _send(self, status: int, headers: dict[str, str], data: bytes = b"", body: bool = False) -> None:
            self.send_response(status)
            for k, v in {"Content-Length": str(len(data)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _error(self, status: int, code: str, commit: bool) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": f"{code}: {self.path}"}
            if commit:  # the hub names the commit when the repo exists; the client caches the file's absence
                headers["X-Repo-Commit"] = hub.commit
            self._send(status, headers)

        def _answer(self, body: bool) -> None:
            hub.requests.append(f"{role} {self.command} {self.path}")
            if role == "cdn":
                data = blobs.get(self.path.removeprefix("/blobs/"))
                if data is None:
                    self._send(403, {})  # what a CDN / bucket says to an unsigned or unknown object
                else:
                    self._send(200, {"Content-Type": "application/octet-stream"}, data, body)
                return
            m = resolve.match(self.path)
            if m is None:
                self._send(404, {})
            elif unquote(m["repo"]) != hub.repo:
                self._error(401, "RepoNotFound", commit=False)
            elif unquote(m["rev"]) not in ("main", hub.commit):
                self._error(404, "RevisionNotFound", commit=False)
            elif (data := hub.files.get(unquote(m["file"]))) is None:
                self._error(404, "EntryNotFound", commit=True)
            else:
                sha = hashlib.sha256(data).hexdigest()
                self._send(
                    302,
                    {
                        "X-Repo-Commit": hub.commit,
                        "ETag": '"' + hashlib.sha1(b"git pointer " + sha.encode()).hexdigest() + '"',
                        "X-Linked-Etag": f'"{sha}"',  # an LFS file's etag is its sha256
                        "X-Linked-Size": str(len(data)),
                        "Location": f"{hub.cdn}/blobs/{sha}",
                    },
                )

    return Handler


@pytest.fixture
def fake_hub_factory() -> Iterator:
    """Starts a :class:`FakeHub` for the files given; both servers stop when the test ends."""
    servers: list[ThreadingHTTPServer] = []

    def start(files: dict[str, bytes]) -> FakeHub:
        hub = FakeHub(files)
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub, role))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append(server)
            url = f"http://127.0.0.1:{server.server_address[1]}"
            if role == "hub":
                hub.endpoint = url
            else:
                hub.cdn = url
        return hub

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def served_checkpoint(tmp_path_factory) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A full tf_efficientnetv2_b0 checkpoint (classifier included, as timm's hub repo has it) as safetensors bytes.

    Random, but from a seed other than build_backbone's default 0, so a model that ignored the download and
    started from its own random init could not pass for one that loaded it.
    """
    import timm
    from safetensors.torch import load_file, save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(20_240_612)
        state = timm.create_model(TIMM_NAME, pretrained=False).state_dict()
    path = tmp_path_factory.mktemp("served") / WEIGHTS_FILE
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path.read_bytes(), load_file(str(path))


RESOLVE_SCRIPT = r"""
import json, sys
from safetensors.torch import save_file
from lesionlab.models.backbones import build_backbone, hub_reachable, resolve_weights, tensors_sha256

reachable = hub_reachable()
weights = resolve_weights(sys.argv[1])
built = build_backbone(weights).state_dict()
save_file({k: built[k].contiguous() for k in sys.argv[3:]}, sys.argv[2])
print("RESULT " + json.dumps({
    "hub_reachable": reachable,
    "weights": weights.describe(),
    "state_keys": sorted(weights.state_dict or {}),
    "built_sha256": tensors_sha256(built),
}))
"""


def _result(proc: subprocess.CompletedProcess, hub: FakeHub | None = None) -> dict:
    where = f"\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}\n" + (hub.log() if hub else "")
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}){where}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"subprocess printed no RESULT line{where}"
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_hub_path_end_to_end(tmp_path, fake_hub_factory, served_checkpoint):
    """resolve_weights downloads timm's checkpoint from the (fake) hub; build_backbone loads exactly those tensors."""
    import timm
    from safetensors.torch import load_file

    data, served = served_checkpoint
    hub = fake_hub_factory({WEIGHTS_FILE: data})
    cfg = timm.models.get_pretrained_cfg(TIMM_NAME)
    assert cfg is not None
    # timm drops the classifier for a feature extractor (num_classes=0); everything else must arrive unchanged
    expected = {k: v for k, v in served.items() if not k.startswith(f"{cfg.classifier}.")}
    assert len(expected) < len(served)
    compared = ["conv_stem.weight", sorted(expected)[-1]]
    out = tmp_path / "built.safetensors"
    proc = subprocess.run(
        [sys.executable, "-c", RESOLVE_SCRIPT, BACKBONE, str(out), *compared],
        env=hub_env(tmp_path, hub.endpoint),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    r = _result(proc, hub)
    w, log = r["weights"], hub.log()

    assert r["hub_reachable"] is True, log
    assert w["backbone"] == BACKBONE and w["pretrained"] is True, w
    assert w["source"].startswith("hub:") and w["source"] == f"hub:{HUB_REPO}" == f"hub:{cfg.hf_hub_id}", w
    assert w["sha256"] == tensors_sha256(expected), w
    assert r["built_sha256"] == w["sha256"]
    assert r["state_keys"] == sorted(expected)
    # normalised as timm's pretrained cfg says; fed the study's 224 px (timm trained these weights at 192 and
    # tests them at 224), with timm's sizes recorded beside
    assert w["mean"] == list(cfg.mean) and w["std"] == list(cfg.std), w
    assert w["input_size"] == 224, w
    assert w["pretrained_cfg"]["input_size"] == list(cfg.input_size), w
    assert w["pretrained_cfg"]["mean"] == list(cfg.mean), w
    built = load_file(str(out))
    for k in compared:
        assert torch.equal(built[k], served[k]), k

    # the layout timm asks for: HEAD on the hub's resolve URL, then GET of the blob at the CDN it redirects to
    sha = hashlib.sha256(data).hexdigest()
    assert f"hub HEAD /{HUB_REPO}/resolve/main/{WEIGHTS_FILE}" in hub.requests, log
    assert f"cdn GET /blobs/{sha}" in hub.requests, log
    snapshot = tmp_path / "hf-cache" / f"models--{HUB_REPO.replace('/', '--')}" / "snapshots" / COMMIT / WEIGHTS_FILE
    assert snapshot.is_file(), f"not in HF_HUB_CACHE: {snapshot}\n{log}"


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("https://hf-mirror.example", ("hf-mirror.example", 443)),
        ("http://mirror.local/", ("mirror.local", 80)),
        ("https://[::1]:8443/hub", ("::1", 8443)),
    ],
)
def test_endpoint_address(url, address):
    assert endpoint_address(url) == address


@pytest.mark.parametrize("url", ["ftp://mirror.local", "mirror.local:80", "http://", "http://h:port"])
def test_endpoint_address_refuses_what_is_not_an_http_url(url):
    with pytest.raises(ValueError):
        endpoint_address(url)


@pytest.fixture
def ports() -> Iterator[tuple[int, int]]:
    """(a port that accepts connections, a port nobody listens on), both on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listening:
        with socket.create_server(("127.0.0.1", 0)) as s:
            closed = s.getsockname()[1]  # bound, then closed: connections are refused
        yield listening.getsockname()[1], closed


def test_hub_reachable_with_an_explicit_endpoint(ports, monkeypatch):
    """In the test process: LESIONLAB_OFFLINE (conftest) and HF_HUB_OFFLINE read at call time; the probe itself."""
    up, down = ports
    assert os.environ.get("LESIONLAB_OFFLINE") == "1"
    assert hub_reachable(f"http://127.0.0.1:{up}") is False
    monkeypatch.delenv("LESIONLAB_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # whatever the environment of the test run said
    assert hub_reachable(f"http://127.0.0.1:{up}", timeout=2) is True
    assert hub_reachable(f"http://127.0.0.1:{down}", timeout=2) is False
    assert hub_reachable("not a url") is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable(f"http://127.0.0.1:{up}", timeout=2) is False


# huggingface_hub is imported first, as it would be by any import of timm, and the variable then removed: from
# there on only the client's constant knows the run is offline, and hub_reachable must still honour it.
REACHABLE_SCRIPT = r"""
import json, os
import huggingface_hub.constants
os.environ.pop("HF_HUB_OFFLINE", None)
from lesionlab.models.backbones import hub_endpoint, hub_reachable
print("RESULT " + json.dumps({"endpoint": hub_endpoint(), "reachable": hub_reachable(timeout=2)}))
"""


def test_hub_reachable_follows_the_hub_clients_settings(tmp_path, ports):
    """HF_ENDPOINT as read at import picks host and port; HF_HUB_OFFLINE as read at import turns the hub off."""
    up, down = ports
    cases = {  # name: (endpoint, extra environment, expected)
        "reachable": (f"http://127.0.0.1:{up}", {}, True),
        "closed port": (f"http://127.0.0.1:{down}", {}, False),
        "HF_HUB_OFFLINE=1": (f"http://127.0.0.1:{up}", {"HF_HUB_OFFLINE": "1"}, False),
    }
    # all at once: each pays for importing torch, and the cases do not interfere
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", REACHABLE_SCRIPT],
            env=hub_env(tmp_path / re.sub(r"\W+", "-", name), endpoint, **extra),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (endpoint, extra, _) in cases.items()
    }
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=60)
        r = _result(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
        endpoint, _, expected = cases[name]
        assert r == {"endpoint": endpoint, "reachable": expected}, name
