"""Serving benchmarks: (a) ONNX Runtime vs PyTorch eager, same model, same run; (b) HTTP load on loopback.

    python bench/serve.py --model runs/my-run                 # both parts, prints a markdown summary
    python bench/serve.py --model runs/my-run --part load --workers 1 --server-threads 1 --inference-threads 2

(a) times the model alone (a normalised 1x3xSxS input; batch 32 for throughput), alternating the two
runtimes in blocks (rounds) so background load hits both alike, plus ONNX end to end (resize + normalise +
model + lesion detector). (b) starts `lesionlab serve` as one process and a client as another
(`bench/serve.py client ...`) that keeps C connections busy with POST /predict for a fixed time.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
#: Both runtimes keep their worker threads spinning for a while after a call; a pause between blocks
#: stops one runtime's spinning threads from slowing the other's timed calls.
PAUSE_S = 0.5


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def load_avg() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------ (a) runtimes


def bench_runtimes(
    model_dir: Path, image: Path, threads: int, rounds: int, per_round: int, batch_runs: int, pause_s: float = PAUSE_S
) -> dict:
    import torch

    from lesionlab.data.images import open_image
    from lesionlab.inference.predictor import OnnxPredictor, TorchPredictor
    from lesionlab.serve.service import limit_blas_threads

    limit_blas_threads()  # as the server does (the lesion detector's matrix product)
    torch.set_num_threads(threads)
    onnx, tuned = OnnxPredictor(model_dir, threads), TorchPredictor(model_dir, threads)
    eager = PlainEager(TorchPredictor(model_dir, threads))
    runtimes = (("onnxruntime", onnx), ("pytorch", eager), ("pytorch-channels-last", tuned))
    pil = open_image(image)
    x1 = onnx.info.pre.network_input(onnx.info.pre.resized(pil)[None])
    x32 = np.repeat(x1, 32, axis=0)
    single: dict[str, list[float]] = {name: [] for name, _ in runtimes}
    cpu: dict[str, float] = {name: 0.0 for name, _ in runtimes}
    batch: dict[str, list[float]] = {name: [] for name, _ in runtimes}
    e2e: list[float] = []
    for _, p in runtimes:
        for _ in range(5):
            p._forward(x1)
        p._forward(x32)
    start_load = load_avg()
    for _ in range(rounds):
        for name, p in runtimes:
            time.sleep(pause_s)
            c = time.process_time()
            for _ in range(per_round):
                t = time.perf_counter()
                p._forward(x1)
                single[name].append((time.perf_counter() - t) * 1000)
            cpu[name] += time.process_time() - c
        time.sleep(pause_s)
        for _ in range(per_round // 4):
            t = time.perf_counter()
            onnx.analyze([pil])
            e2e.append((time.perf_counter() - t) * 1000)
    for name, p in runtimes:
        time.sleep(pause_s)
        for _ in range(batch_runs):
            t = time.perf_counter()
            p._forward(x32)
            batch[name].append(time.perf_counter() - t)
    out = {
        "threads": threads,
        "n_single": rounds * per_round,
        "load_avg_before": start_load,
        "load_avg_after": load_avg(),
    }
    for name in single:
        out[name] = {
            "p50_ms": pct(single[name], 50),
            "p99_ms": pct(single[name], 99),
            "cpu_ms_per_call": 1000 * cpu[name] / len(single[name]),
            "batch32_img_per_s": 32 / float(np.median(batch[name])),
        }
    out["onnx_end_to_end"] = {"p50_ms": pct(e2e, 50), "p99_ms": pct(e2e, 99), "n": len(e2e)}
    out["speedup_p50"] = out["pytorch"]["p50_ms"] / out["onnxruntime"]["p50_ms"]
    out["speedup_p50_vs_channels_last"] = out["pytorch-channels-last"]["p50_ms"] / out["onnxruntime"]["p50_ms"]
    return out


class PlainEager:
    """PyTorch eager as a user runs it: NCHW fp32 tensors, no memory-format tuning (TorchPredictor uses
    channels-last, which oneDNN runs faster; it is timed as its own row)."""

    def __init__(self, predictor):
        import torch

        self.model = predictor.model.to(memory_format=torch.contiguous_format)

    def _forward(self, x: np.ndarray):
        import torch

        with torch.inference_mode():
            feats = self.model.backbone(torch.from_numpy(x))
            return self.model.head(feats).numpy(), feats.numpy()


# ------------------------------------------------------------------ (b) HTTP load


def client_main(port: int, concurrency: int, duration: float, warmup: float, body_path: Path) -> dict:
    """Runs in its own process: C threads, one keep-alive connection each, POST /predict until time is up."""
    body = body_path.read_bytes()
    headers = {"Content-Type": "application/json"}
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    statuses: dict[int, int] = {}
    completed = [0] * concurrency  # every answered request, warm-up included (for CPU per request)
    lock = threading.Lock()
    t0 = time.perf_counter()
    measure_from, stop_at = t0 + warmup, t0 + warmup + duration

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            start = time.perf_counter()
            if start >= stop_at:
                break
            try:
                conn.request("POST", "/predict", body=body, headers=headers)
                r = conn.getresponse()
                r.read()
                status = r.status
            except OSError:
                status = -1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            end = time.perf_counter()
            completed[i] += 1
            if start >= measure_from and end <= stop_at:
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies[i].append((end - start) * 1000)
                else:
                    errors[i] += 1
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = [x for xs in latencies for x in xs]
    times = os.times()
    return {
        "client_cpu_s": times.user + times.system,
        "all_requests": sum(completed),
        "concurrency": concurrency,
        "duration_s": duration,
        "requests_ok": len(lat),
        "errors": sum(errors),
        "req_per_s": len(lat) / duration,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process and all its descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model_dir: Path, workers: int, threads: int | None, inference_threads: int
) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "lesionlab",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--inference-threads",
        str(inference_threads),
        "--no-access-log",
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {' '.join(cmd)}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health/ready")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.25)
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit("server did not become ready in 120 s")


def bench_http(
    model_dir: Path,
    image: Path,
    levels: list[int],
    duration: float,
    workers: int,
    threads: int | None,
    inference_threads: int,
    tmp: Path,
) -> dict:
    body_path = tmp / "bench-body.json"
    body_path.write_text(json.dumps({"image": base64.b64encode(image.read_bytes()).decode()}))
    proc, port = start_server(model_dir, workers, threads, inference_threads)
    results = []
    try:
        for c in levels:
            load, cpu0 = load_avg(), tree_cpu_seconds(proc.pid)
            out = subprocess.run(
                [
                    sys.executable,
                    str(HERE),
                    "client",
                    "--port",
                    str(port),
                    "--concurrency",
                    str(c),
                    "--duration",
                    str(duration),
                    "--body",
                    str(body_path),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout)
            r["load_avg_before"] = load
            # the server's CPU over the whole client run (1 s warm-up included) per request answered in it
            served = r.pop("all_requests")
            r["server_cpu_ms_per_req"] = 1000 * (tree_cpu_seconds(proc.pid) - cpu0) / max(1, served)
            r["client_cpu_ms_per_req"] = 1000 * r.pop("client_cpu_s") / max(1, served)
            results.append(r)
            print(
                f"  c={c}: {r['req_per_s']:.1f} req/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                f"errors {r['errors']}",
                file=sys.stderr,
            )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
        body_path.unlink(missing_ok=True)
    from lesionlab.serve.settings import default_threads

    return {
        "workers": workers,
        "threads": threads or default_threads(workers, inference_threads),
        "inference_threads": inference_threads,
        "image_bytes": image.stat().st_size,
        "levels": results,
    }


# ------------------------------------------------------------------ report


def markdown(res: dict) -> str:
    lines = [f"model `{res['model']}`, image `{res['image']}`, {res['machine']}", ""]
    if "runtimes" in res:
        r = res["runtimes"]
        lines += [
            f"(a) model only, {r['threads']} intra-op threads, {r['n_single']} single-image calls per runtime "
            f"(load average {r['load_avg_before']:.2f} -> {r['load_avg_after']:.2f})",
            "",
            "| runtime | single p50 ms | single p99 ms | CPU ms per single call | batch-32 images/s |",
            "|---|---|---|---|---|",
        ]
        for name in ("onnxruntime", "pytorch", "pytorch-channels-last"):
            x = r[name]
            lines.append(
                f"| {name} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {x['cpu_ms_per_call']:.2f} | "
                f"{x['batch32_img_per_s']:.1f} |"
            )
        e = r["onnx_end_to_end"]
        lines += [
            "",
            f"ONNX Runtime speed-up at p50: {r['speedup_p50']:.2f}x over PyTorch eager, "
            f"{r['speedup_p50_vs_channels_last']:.2f}x over channels-last PyTorch. ONNX end to end (resize, normalise, "
            f"model, lesion detector): p50 {e['p50_ms']:.2f} ms, p99 {e['p99_ms']:.2f} ms.",
            "",
        ]
    if "http" in res:
        h = res["http"]
        lines += [
            f"(b) HTTP POST /predict, {h['workers']} worker(s) x {h['threads']} intra-op thread(s), "
            f"{h['inference_threads']} inference thread(s) per worker, {h['image_bytes']} byte JPEG",
            "",
            "| concurrency | req/s | p50 ms | p99 ms | errors | server CPU ms/req | client CPU ms/req | "
            "load avg before |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for x in h["levels"]:
            lines.append(
                f"| {x['concurrency']} | {x['req_per_s']:.1f} | {x['p50_ms']:.1f} | {x['p99_ms']:.1f} | "
                f"{x['errors']} | {x['server_cpu_ms_per_req']:.1f} | {x['client_cpu_ms_per_req']:.1f} | "
                f"{x['load_avg_before']:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("client", help="internal: the load-generating process")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--concurrency", type=int, required=True)
    c.add_argument("--duration", type=float, required=True)
    c.add_argument("--warmup", type=float, default=1.0)
    c.add_argument("--body", type=Path, required=True)
    ap.add_argument("--model", type=Path, help="Model folder with model.onnx and model.pt")
    ap.add_argument("--image", type=Path, help="A JPEG to send (default: the first test/malignant image)")
    ap.add_argument("--part", choices=("all", "runtimes", "load"), default="all")
    ap.add_argument("--threads", type=int, default=2, help="Intra-op threads of the runtimes part")
    ap.add_argument("--server-threads", type=int, help="Intra-op threads per request (default: lesionlab serve's)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=40)
    ap.add_argument("--batch-runs", type=int, default=5)
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--duration", type=float, default=10.0, help="Seconds measured per concurrency level")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--inference-threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="Write the results as JSON here")
    args = ap.parse_args()
    if args.cmd == "client":
        print(json.dumps(client_main(args.port, args.concurrency, args.duration, args.warmup, args.body)))
        return
    if not args.model:
        ap.error("--model is required")
    image = args.image or _default_image()
    res: dict = {
        "model": str(args.model),
        "image": str(image),
        "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}",
    }
    if args.part in ("all", "runtimes"):
        res["runtimes"] = bench_runtimes(args.model, image, args.threads, args.rounds, args.per_round, args.batch_runs)
    if args.part in ("all", "load"):
        res["http"] = bench_http(
            args.model,
            image,
            [int(x) for x in args.levels.split(",")],
            args.duration,
            args.workers,
            args.server_threads,
            args.inference_threads,
            Path("/tmp"),
        )
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    print(markdown(res))


def _default_image() -> Path:
    from lesionlab.data.dataset import default_data_dir

    root = default_data_dir()
    if root is None:
        raise SystemExit("no data folder found; pass --image FILE.jpg")
    return sorted((root / "test" / "malignant").iterdir())[0]


if __name__ == "__main__":
    main()
