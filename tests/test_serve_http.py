"""The real server: `lesionlab serve` in a subprocess on a free loopback port, spoken to over HTTP."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

BODY_CAP = 300_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited early:\n{proc.stderr.read().decode()}"  # type: ignore[union-attr]
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health/ready")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become ready")


def start_server(model_dir: Path, *extra: str, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """`python -m lesionlab serve` on a free port; the caller stops it with stop_server."""
    port = free_port()
    cmd = [sys.executable, "-m", "lesionlab", "serve", "--model", str(model_dir), "--port", str(port), *extra]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        wait_ready(port, proc)
    except BaseException:
        stop_server(proc)
        raise
    return proc, port


def stop_server(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.stderr.read().decode() if proc.stderr else ""


@pytest.fixture(scope="module")
def server(onnx_run):
    proc, port = start_server(onnx_run, "--max-body-bytes", str(BODY_CAP), "--threads", "1")
    yield port
    stop_server(proc)


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), data


@pytest.fixture(scope="module")
def lesion_jpeg(small_data) -> bytes:
    return sorted((small_data / "test" / "malignant").iterdir())[0].read_bytes()


def test_health_over_http(server):
    for path in ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"):
        assert request(server, "GET", path)[0] == 200


def test_study_contract_over_http(server, lesion_jpeg):
    body = json.dumps({"image": base64.b64encode(lesion_jpeg).decode()}).encode()
    status, headers, data = request(server, "POST", "/predict", body, {"Content-Type": "application/json"})
    env = json.loads(data)
    assert status == env["statusCode"] == 200 and headers["content-type"] == "application/json"
    assert env["body"]["predicted_label"] in ("benign", "malignant")


def test_multipart_upload_over_http(server, lesion_jpeg):
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + lesion_jpeg
        + f"\r\n--{boundary}--\r\n".encode()
    )
    status, _, data = request(
        server, "POST", "/v1/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    out = json.loads(data)
    assert status == 200 and out["label"] in ("benign", "malignant") and out["inference_ms"] > 0


def test_declared_oversize_body_is_refused_before_reading(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(BODY_CAP * 10))
    conn.endheaders()  # no body sent at all: the answer must not wait for it
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["statusCode"] == 413
    conn.close()


def test_chunked_oversize_body_is_cut_off(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    chunks = (b"A" * 10_000 for _ in range(BODY_CAP // 10_000 + 5))
    # the server may answer and close before the client finished sending
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        conn.request(
            "POST", "/v1/predict", body=chunks, headers={"Content-Type": "application/json"}, encode_chunked=True
        )
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"] == "body_too_large"
    conn.close()


def test_bad_inputs_over_http(server):
    assert request(server, "POST", "/predict", b"%%%", {"Content-Type": "text/plain"})[0] == 400
    text = base64.b64encode(b"plain text, not an image").decode()
    assert (
        request(server, "POST", "/predict", json.dumps({"image": text}).encode(), {"Content-Type": "application/json"})[
            0
        ]
        == 415
    )
    assert request(server, "GET", "/nowhere")[0] == 404


def test_auth_and_workers_over_http(onnx_run, lesion_jpeg):
    proc, port = start_server(onnx_run, "--workers", "2", "--threads", "1", env={"LESIONLAB_API_TOKENS": "tok-1"})
    try:
        body = json.dumps({"image": base64.b64encode(lesion_jpeg).decode()}).encode()
        ready_streak, deadline = 0, time.monotonic() + 60
        while ready_streak < 8:  # each worker loads its own model: wait until all of them answer ready
            assert time.monotonic() < deadline, "workers did not all become ready"
            ready_streak = ready_streak + 1 if request(port, "GET", "/health/ready")[0] == 200 else 0
        assert request(port, "POST", "/predict", body)[0] == 401
        for _ in range(4):  # spread over both workers
            assert request(port, "POST", "/predict", body, {"Authorization": "Bearer tok-1"})[0] == 200
    finally:
        log = stop_server(proc)
    assert lesion_jpeg[:64].hex() not in log and base64.b64encode(lesion_jpeg).decode()[100:160] not in log


def test_bench_script_smoke(onnx_run, small_data, tmp_path, monkeypatch):
    """bench/serve.py's two parts on the tiny model with minimal counts (the client still runs as a subprocess)."""
    import importlib.util

    from lesionlab.serve import service

    monkeypatch.setattr(service, "limit_blas_threads", lambda: None)  # process-wide; not inside pytest

    script = Path(__file__).resolve().parents[1] / "bench" / "serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", script)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    image = sorted((small_data / "test" / "benign").iterdir())[0]
    res = {
        "model": str(onnx_run),
        "image": str(image),
        "machine": "test",
        "runtimes": bench.bench_runtimes(onnx_run, image, threads=1, rounds=1, per_round=4, batch_runs=1, pause_s=0),
        "http": bench.bench_http(onnx_run, image, [2], 1.0, 1, 1, 2, tmp_path),
    }
    assert res["runtimes"]["onnxruntime"]["p50_ms"] > 0 and res["runtimes"]["pytorch"]["batch32_img_per_s"] > 0
    (level,) = res["http"]["levels"]
    assert level["concurrency"] == 2 and level["errors"] == 0 and level["requests_ok"] > 0
    text = bench.markdown(res)
    assert "| onnxruntime |" in text and "| 2 |" in text
