"""Training throughput and memory on the CPU: the figures behind docs/benchmarks.md's training section.

Usage:
    python bench/train.py                              # every scenario, one job at a time
    python bench/train.py --only throughput            # one scenario (or several: --only workers,ddp)
    python bench/train.py --only memory --n 2000 --size 128 --memory-steps 10   # a small smoke run

Every figure comes from ``lesionlab train`` run as a subprocess (``--device cpu --mode finetune --no-eval
--quiet``): images per second is the run's own ``config.json`` ``compute.images_per_second`` (training steps only:
augmentation, forward, backward, optimizer; not data preparation or validation), wall time is
``time.perf_counter`` around the subprocess. Scenarios:

- ``throughput``: this tree's code against the baseline (git commit de5a399, checked out once as a detached
  worktree in /tmp/lesionlab-baseline and run with ``PYTHONPATH=<worktree>/src python -m lesionlab``), for
  efficientnet_lite0 and mobilenetv2, ``--epochs 1`` on the same small subset of isic-kaggle (a folder of
  symlinks to the first K images per class of train/ and test/; K = 160 gives 320 training images, 256 after the
  20% validation share, i.e. 8 steps of 32). Each run starts with an empty cache (cold).
- ``workers``: this tree, efficientnet_lite0 on the subset with ``--data-workers 0``, ``1`` and ``2`` (0 = load in
  the main process), on a warm cache: one run first fills it, then each measured run gets a new ``--out``.
- ``memory``: this tree, efficientnet_lite0 ``--input-size 384 --max-steps 200 --data-workers 1`` on a generated
  set (``bench/make_images.py``: 30000 JPEGs of 384 px in /tmp/lesionlab-bench-30k, kept between bench runs),
  cold cache. Every 0.5 s it sums, over the run's process and all its descendants (children by the ppid of
  /proc/*/stat), RssAnon and VmRSS from /proc/PID/status and Pss_Anon from /proc/PID/smaps_rollup, and reports
  each one's peak; then the cache folder's size on disk (allocated blocks: its file is sparse; apparent size
  beside it) and, for contrast, today's design: an in-memory uint8 array of n x size x size x 3 bytes.
  ``--memory-checkpointing`` adds ``--grad-checkpointing`` (activations recomputed in the backward pass).
- ``ddp``: this tree on the subset, one process against ``torchrun --standalone --nproc-per-node 2 -m lesionlab
  train`` with the same flags and the same global batch. On 2 cores two processes share the cores one process
  already uses: this measures the cost of DDP (gloo), it cannot be a speed-up.

The runs use ``LESIONLAB_CACHE_DIR`` set to a fresh temporary folder (removed afterwards), so no run reads the
user's cache. Each scenario prints a markdown table; all results, with the exact command lines, go to ``--json``
(default bench/results/train.json), rewritten after each scenario.

Needs 2 quiet cores: do not run it beside another heavy job (it refuses to start while the 1-minute load average
is above ``--max-load``; ``--allow-busy`` overrides, for a smoke test only). The new-code scenarios need
``lesionlab train``'s ``--data-workers``, ``--input-size`` and ``--max-steps``, and ``ddp`` needs DDP support
under torchrun; it checks the flags before starting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
PYTHON = BIN / "python"
LESIONLAB = BIN / "lesionlab"
TORCHRUN = BIN / "torchrun"
SCENARIOS = ("throughput", "workers", "memory", "ddp")
#: the flags of ``lesionlab train`` each scenario needs from this tree (checked with ``--help`` before running)
NEEDS: dict[str, tuple[str, ...]] = {
    "throughput": (),
    "workers": ("--data-workers",),
    "memory": ("--data-workers", "--input-size", "--max-steps"),
    "ddp": (),
}
GB = 1e9
LOG_TAIL = 3000


# --------------------------------------------------------------------------------------------- runs


@dataclass
class Code:
    """How to start ``lesionlab``: the command's first words and what it sets in (or removes from) the env."""

    name: str
    prefix: list[str]
    env: dict[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ("PYTHONPATH",)


@dataclass
class Run:
    """One ``lesionlab train`` subprocess and what it reported."""

    label: str
    command: list[str]
    command_line: str
    env: dict[str, str]
    out: str
    log: str
    rc: int | None = None
    wall_seconds: float | None = None
    images_per_second: float | None = None
    images_trained: int | None = None
    compute: dict[str, Any] | None = None
    timing: dict[str, Any] | None = None
    recorded_command: str | None = None
    load_before: float | None = None
    memory: dict[str, Any] | None = None
    log_tail: str | None = None

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.images_per_second is not None


def new_code() -> Code:
    return Code("new", [str(LESIONLAB)])


def baseline_code(worktree: Path) -> Code:
    return Code("baseline", [str(PYTHON), "-m", "lesionlab"], env={"PYTHONPATH": str(worktree / "src")}, unset=())


def ddp_code(procs: int, threads: int) -> Code:
    """torchrun on this tree; OMP_NUM_THREADS set explicitly (torchrun would set 1 itself, with a warning)."""
    prefix = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(procs), "-m", "lesionlab"]
    return Code(f"ddp x{procs}", prefix, env={"OMP_NUM_THREADS": str(threads)})


def train_args(
    data: Path, out: Path, backbone: str, batch_size: int, precision: str, weights_dir: Path, extra: Sequence[str] = ()
) -> list[str]:
    """The flags every run shares: one finetune epoch on the CPU, no evaluation, no progress bars."""
    return [
        "train",
        "--data",
        str(data),
        "--mode",
        "finetune",
        "--backbone",
        backbone,
        "--epochs",
        "1",
        "--batch-size",
        str(batch_size),
        "--precision",
        precision,
        "--device",
        "cpu",
        "--weights-dir",
        str(weights_dir),
        "--no-eval",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]


def shell_line(env: dict[str, str], cmd: Sequence[str], unset: Sequence[str] = ()) -> str:
    """The command as one pasteable shell line, env assignments first."""
    parts = [f"-u {k}" for k in unset]
    assign = [f"{k}={shlex.quote(v)}" for k, v in env.items()]
    prefix = (["env", *parts] if parts else []) + assign
    return " ".join([*prefix, shlex.join(cmd)])


def read_config(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def log_of(out: Path) -> Path:
    return out.parent / f"{out.name}.log"


def unique_out(work: Path, label: str) -> Path:
    slug = re.sub(r"[^a-zA-Z0-9._-]+", "-", label).strip("-")
    out, k = work / slug, 1
    while out.exists() or log_of(out).exists():
        k += 1
        out = work / f"{slug}-{k}"
    return out


def execute(
    label: str,
    code: Code,
    args: list[str],
    out: Path,
    cache: Path,
    sample_every: float | None = None,
) -> Run:
    """Runs one training subprocess from the repository root, its output in OUT.log beside the run folder.

    ``sample_every``: also sample the process tree's memory at that interval (seconds) until it exits."""
    env_set = {**code.env, "LESIONLAB_CACHE_DIR": str(cache)}
    env = {k: v for k, v in os.environ.items() if k not in code.unset}
    env.update(env_set)
    cmd = [*code.prefix, *args]
    log = log_of(out)
    run = Run(label, cmd, shell_line(env_set, cmd, code.unset), env_set, str(out), str(log))
    run.load_before = round(os.getloadavg()[0], 2)
    print(f"[{datetime.now():%H:%M:%S}] {label}: {run.command_line}", flush=True)
    with log.open("w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        if sample_every:
            run.memory = watch_memory(proc, sample_every)
        run.rc = proc.wait()
        run.wall_seconds = round(time.perf_counter() - t0, 2)
    config = read_config(out)
    run.compute, run.timing = config.get("compute"), config.get("timing")
    run.recorded_command = config.get("command")
    if run.compute:
        run.images_per_second = run.compute.get("images_per_second")
        run.images_trained = run.compute.get("images_trained")
    if not run.ok:
        run.log_tail = log.read_text(errors="replace")[-LOG_TAIL:]
        print(f"  FAILED (rc {run.rc}, images/s {run.images_per_second}); log tail:\n{run.log_tail}", flush=True)
    else:
        print(f"  {run.images_per_second} images/s, {run.wall_seconds} s wall", flush=True)
    return run


# ------------------------------------------------------------------------------------------- memory


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from the ppid field of every /proc/PID/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])  # after "(comm)": state, ppid, ...
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def proc_fields(path: str, keys: Sequence[str]) -> dict[str, int]:
    """``Key: N kB`` lines of a /proc file, in bytes (missing keys and vanished processes: absent)."""
    out: dict[str, int] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in keys:
            out[name] = int(value.split()[0]) * 1024
    return out


def sample_tree(root: int) -> dict[str, int]:
    """Summed RssAnon, VmRSS and Pss_Anon (bytes) over the tree, and how many processes it has."""
    total = {"RssAnon": 0, "VmRSS": 0, "Pss_Anon": 0, "processes": 0}
    for pid in process_tree(root):
        status = proc_fields(f"/proc/{pid}/status", ("RssAnon", "VmRSS"))
        if not status:
            continue
        total["processes"] += 1
        total["RssAnon"] += status.get("RssAnon", 0)
        total["VmRSS"] += status.get("VmRSS", 0)
        total["Pss_Anon"] += proc_fields(f"/proc/{pid}/smaps_rollup", ("Pss_Anon",)).get("Pss_Anon", 0)
    return total


def watch_memory(proc: subprocess.Popen, every: float) -> dict[str, Any]:
    """Samples ``proc``'s tree every ``every`` seconds until it exits; the peak of each sum."""
    peak = {"RssAnon": 0, "VmRSS": 0, "Pss_Anon": 0, "processes": 0}
    samples = 0
    while proc.poll() is None:
        now = sample_tree(proc.pid)
        samples += 1
        for k, v in now.items():
            peak[k] = max(peak[k], v)
        time.sleep(every)
    return {
        "peak_rss_anon_gb": round(peak["RssAnon"] / GB, 3),
        "peak_pss_anon_gb": round(peak["Pss_Anon"] / GB, 3),
        "peak_vm_rss_gb": round(peak["VmRSS"] / GB, 3),
        "peak_processes": peak["processes"],
        "samples": samples,
        "interval_seconds": every,
        "note": "each figure is the peak over samples of its sum over the process and all its descendants; "
        "peaks of different figures may come from different samples",
    }


def disk_usage(path: Path) -> dict[str, int]:
    """Bytes under ``path``: allocated (st_blocks x 512, what ``du -s`` counts; a sparse file's holes are free)
    and apparent (file sizes, what ``du -sb`` counts). Symlinks are not followed."""
    allocated = apparent = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            allocated += st.st_blocks * 512
            apparent += st.st_size
    return {"allocated_bytes": allocated, "apparent_bytes": apparent}


# ----------------------------------------------------------------------------------- data and code


def build_subset(source: Path, dest: Path, k_train: int, k_test: int) -> Path:
    """``dest``: symlinks to the first K files (by name) of each class folder of source's train/ and test/.

    Kept between bench runs; rebuilt when ``.subset.json`` records another source or K."""
    wanted = {"source": str(source.resolve()), "k_train": k_train, "k_test": k_test}
    marker = dest / ".subset.json"
    try:
        if json.loads(marker.read_text()) == wanted:
            return dest
    except (OSError, ValueError):
        pass
    if dest.exists():
        shutil.rmtree(dest)
    for split, k in (("train", k_train), ("test", k_test)):
        for cls in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            files = sorted(p for p in cls.iterdir() if p.is_file() and not p.name.startswith("."))[:k]
            if len(files) < k:
                raise SystemExit(f"{cls} has {len(files)} files, fewer than the {k} the subset asks for")
            target = dest / split / cls.name
            target.mkdir(parents=True)
            for f in files:
                (target / f.name).symlink_to(f.resolve())
    marker.write_text(json.dumps(wanted, indent=2) + "\n")
    return dest


def git(*args: str, cwd: Path = REPO) -> str:
    """A read-only git query (optional locks off, so that it never writes the index)."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, env=env).stdout.strip()


def ensure_baseline(worktree: Path, commit: str) -> str:
    """The baseline worktree at ``commit`` (added, detached, only if missing); returns its full commit hash."""
    full = git("rev-parse", "--verify", f"{commit}^{{commit}}")
    if not full:
        raise SystemExit(f"baseline commit {commit} is not in {REPO}")
    if not (worktree / "src" / "lesionlab").is_dir():
        cmd = ["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), commit]
        print("adding the baseline worktree:", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    head = git("rev-parse", "HEAD", cwd=worktree)
    if head != full:
        raise SystemExit(f"{worktree} is at {head or 'no commit'}, not the baseline {full}: remove it or pass another")
    env = {**os.environ, "PYTHONPATH": str(worktree / "src")}
    found = subprocess.run(
        [str(PYTHON), "-c", "import lesionlab; print(lesionlab.__file__)"], capture_output=True, text=True, env=env
    ).stdout.strip()
    if not found.startswith(str(worktree)):
        raise SystemExit(f"PYTHONPATH={worktree / 'src'} imports lesionlab from {found or 'nowhere'}, not the worktree")
    return full


def train_flags() -> set[str]:
    """The long options ``lesionlab train --help`` lists in this tree."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(COLUMNS="300", NO_COLOR="1", TERM="dumb")
    text = subprocess.run([str(LESIONLAB), "train", "--help"], capture_output=True, text=True, env=env).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]*", text))


def check_flags(scenarios: Sequence[str]) -> None:
    needed = sorted({f for s in scenarios for f in NEEDS[s]})
    if not needed:
        return
    missing = [f for f in needed if f not in train_flags()]
    if missing:
        raise SystemExit(f"`lesionlab train` in this tree has no {', '.join(missing)}: the scenarios need them")


@contextmanager
def cache_folder(root: Path, name: str) -> Iterator[Path]:
    """A fresh, empty LESIONLAB_CACHE_DIR, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"lesionlab-bench-cache-{name}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------- reporting


def fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def median(values: Sequence[float | None]) -> float | None:
    ok = [v for v in values if v is not None]
    return round(statistics.median(ok), 2) if ok else None


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def scenario_record(name: str, what: str, runs: list[Run], rows: list[dict], table: str, notes: list[str]) -> dict:
    return {
        "scenario": name,
        "measures": what,
        "rows": rows,
        "table": table,
        "notes": notes,
        "commands": [r.command_line for r in runs],
        "runs": [asdict(r) for r in runs],
        "all_ok": all(r.ok for r in runs),
    }


# ---------------------------------------------------------------------------------------- scenarios


@dataclass
class Bench:
    """Everything a scenario needs: the parsed options plus the folders prepared for them."""

    args: argparse.Namespace
    work: Path

    def flags(
        self, data: Path, out: Path, backbone: str, extra: Sequence[str] = (), batch: int | None = None
    ) -> list[str]:
        a = self.args
        return train_args(data, out, backbone, batch or a.batch_size, a.precision, a.weights_dir, extra)

    def subset(self) -> Path:
        a = self.args
        dest = a.subset_dir or Path(tempfile.gettempdir()) / f"lesionlab-bench-subset-k{a.subset_k}-{a.subset_k_test}"
        return build_subset(a.data, dest, a.subset_k, a.subset_k_test)

    def run(
        self,
        label: str,
        code: Code,
        backbone: str,
        data: Path,
        cache: Path,
        extra: Sequence[str] = (),
        batch: int | None = None,
        sample: float | None = None,
    ) -> Run:
        out = unique_out(self.work, label)
        return execute(label, code, self.flags(data, out, backbone, extra, batch), out, cache, sample)


def throughput(b: Bench) -> dict:
    a = b.args
    commit = ensure_baseline(a.baseline_dir, a.baseline_commit)
    subset = b.subset()
    codes = [baseline_code(a.baseline_dir), new_code()]
    runs: list[Run] = []
    rows: list[dict] = []
    for backbone in a.backbones:
        got: dict[str, list[Run]] = {c.name: [] for c in codes}
        for rep in range(a.repeats):
            for code in codes:  # interleaved, so that a drift in the machine hits both alike
                with cache_folder(a.cache_root, "throughput") as cache:
                    r = b.run(f"throughput-{backbone}-{code.name}-r{rep}", code, backbone, subset, cache)
                got[code.name].append(r)
                runs.append(r)
        base = median([r.images_per_second for r in got["baseline"]])
        new = median([r.images_per_second for r in got["new"]])
        rows.append(
            {
                "backbone": backbone,
                "baseline_images_per_second": base,
                "new_images_per_second": new,
                "new_over_baseline": ratio(new, base),
                "baseline_wall_seconds": median([r.wall_seconds for r in got["baseline"]]),
                "new_wall_seconds": median([r.wall_seconds for r in got["new"]]),
                "images_trained": got["new"][0].images_trained,
                "baseline_all_images_per_second": [r.images_per_second for r in got["baseline"]],
                "new_all_images_per_second": [r.images_per_second for r in got["new"]],
            }
        )
    headers = ["backbone", "baseline img/s", "new img/s", "new / baseline", "baseline wall s", "new wall s"]
    table = md_table(
        headers,
        [
            [
                r["backbone"],
                fmt(r["baseline_images_per_second"]),
                fmt(r["new_images_per_second"]),
                fmt(r["new_over_baseline"], 2),
                fmt(r["baseline_wall_seconds"]),
                fmt(r["new_wall_seconds"]),
            ]
            for r in rows
        ],
    )
    notes = [
        f"baseline: commit {commit} in {a.baseline_dir}; new: this tree ({git('rev-parse', 'HEAD')} + edits)",
        f"data: {subset} (first {a.subset_k} train / {a.subset_k_test} test images per class of {a.data}), "
        f"--epochs 1, batch {a.batch_size}, cold cache per run, median of {a.repeats} run(s)",
        "images/s: config.json compute.images_per_second (training steps only); wall: the whole subprocess",
    ]
    return scenario_record("throughput", "training images/s, new code vs baseline", runs, rows, table, notes)


def workers(b: Bench) -> dict:
    a = b.args
    subset, backbone = b.subset(), "efficientnet_lite0"
    runs: list[Run] = []
    rows: list[dict] = []
    with cache_folder(a.cache_root, "workers") as cache:
        warm = b.run("workers-warm-up", new_code(), backbone, subset, cache, ["--data-workers", "0"])
        runs.append(warm)
        measured: dict[int, list[Run]] = {w: [] for w in a.workers_list}
        for rep in range(a.repeats):
            for w in a.workers_list:
                r = b.run(f"workers-{w}-r{rep}", new_code(), backbone, subset, cache, ["--data-workers", str(w)])
                measured[w].append(r)
                runs.append(r)
    for w, rs in measured.items():
        rows.append(
            {
                "data_workers": w,
                "images_per_second": median([r.images_per_second for r in rs]),
                "wall_seconds": median([r.wall_seconds for r in rs]),
                "all_images_per_second": [r.images_per_second for r in rs],
            }
        )
    table = md_table(
        ["--data-workers", "img/s", "wall s"],
        [[r["data_workers"], fmt(r["images_per_second"]), fmt(r["wall_seconds"])] for r in rows],
    )
    notes = [
        f"{backbone} finetune on {subset}, --epochs 1, batch {a.batch_size}; warm cache (filled by a first "
        f"--data-workers 0 run, not counted), median of {a.repeats} run(s); 0 = loading in the main process",
    ]
    return scenario_record("workers", "training images/s by --data-workers", runs, rows, table, notes)


def memory(b: Bench) -> dict:
    from make_images import make_images  # bench/make_images.py (numpy, Pillow): imported only here

    a = b.args
    name = "lesionlab-bench-30k" if (a.n, a.size) == (30000, 384) else f"lesionlab-bench-n{a.n}-s{a.size}"
    gen = a.gen_dir or Path(tempfile.gettempdir()) / name
    print(f"generated set: {gen} ({a.n} images of {a.size} px; kept)", flush=True)
    make_images(gen, a.n, a.size, workers=a.gen_workers, distinct=a.distinct)
    array_bytes = a.n * a.size * a.size * 3
    extra = ["--input-size", str(a.size), "--max-steps", str(a.memory_steps), "--data-workers", str(a.memory_workers)]
    extra += ["--grad-checkpointing"] if a.memory_checkpointing else []
    with cache_folder(a.cache_root, "memory") as cache:
        r = b.run(
            "memory", new_code(), "efficientnet_lite0", gen, cache, extra, sample=a.sample_interval,
            batch=a.memory_batch_size,
        )  # fmt: skip
        usage = disk_usage(cache)
    mem = r.memory or {}
    row = {
        "grad_checkpointing": a.memory_checkpointing,
        **{k: mem.get(k) for k in ("peak_rss_anon_gb", "peak_pss_anon_gb", "peak_vm_rss_gb", "peak_processes")},
        "cache_allocated_gb": round(usage["allocated_bytes"] / GB, 3),
        "cache_apparent_gb": round(usage["apparent_bytes"] / GB, 3),
        "todays_design_array_gb": round(array_bytes / GB, 3),
        "images_per_second": r.images_per_second,
        "wall_seconds": r.wall_seconds,
        "images_trained": r.images_trained,
    }
    headers = [
        "peak RssAnon GB",
        "peak Pss_Anon GB",
        "peak VmRSS GB",
        "cache on disk GB (apparent)",
        "today's array GB",
        "img/s",
        "wall s",
    ]
    cells = [
        fmt(row["peak_rss_anon_gb"], 2),
        fmt(row["peak_pss_anon_gb"], 2),
        fmt(row["peak_vm_rss_gb"], 2),
        f"{fmt(row['cache_allocated_gb'], 2)} ({fmt(row['cache_apparent_gb'], 2)})",
        fmt(row["todays_design_array_gb"], 2),
        fmt(row["images_per_second"]),
        fmt(row["wall_seconds"]),
    ]
    arithmetic = (
        f"today's design: {a.n} images x {a.size} x {a.size} x 3 bytes = {array_bytes:,} bytes = "
        f"{array_bytes / GB:.2f} GB in one in-memory uint8 array (before any copy)"
    )
    print(arithmetic, flush=True)
    notes = [
        f"efficientnet_lite0 finetune on {gen} ({a.n} generated JPEGs of {a.size} px), --input-size {a.size} "
        f"--max-steps {a.memory_steps} --data-workers {a.memory_workers}"
        f"{' --grad-checkpointing' if a.memory_checkpointing else ''}, batch {a.memory_batch_size}, cold cache "
        f"({a.distinct or a.n} distinct pictures, the others byte copies in their own files: as costly to decode)",
        f"memory sampled every {a.sample_interval} s, summed over the process tree; GB = 1e9 bytes; VmRSS counts "
        "shared pages once per process (contrast only); Pss_Anon splits shared anonymous pages between processes",
        "cache on disk: allocated blocks (du -s), apparent size (du -sb) in brackets; the cache file is sparse",
        arithmetic,
    ]
    return scenario_record("memory", "peak memory of a large-image run", [r], [row], md_table(headers, [cells]), notes)


def ddp(b: Bench) -> dict:
    a = b.args
    subset, backbone = b.subset(), "efficientnet_lite0"
    ddp_batch = a.ddp_batch_size or a.batch_size
    runs: list[Run] = []
    got: dict[str, list[Run]] = {"1 process": [], f"torchrun x{a.ddp_procs}": []}
    for rep in range(a.repeats):
        with cache_folder(a.cache_root, "ddp") as cache:
            one = b.run(f"ddp-single-r{rep}", new_code(), backbone, subset, cache)
        with cache_folder(a.cache_root, "ddp") as cache:
            code = ddp_code(a.ddp_procs, a.ddp_threads)
            many = b.run(f"ddp-x{a.ddp_procs}-r{rep}", code, backbone, subset, cache, batch=ddp_batch)
        got["1 process"].append(one)
        got[f"torchrun x{a.ddp_procs}"].append(many)
        runs += [one, many]
    rows = [
        {
            "setup": name,
            "batch_size_flag": a.batch_size if name == "1 process" else ddp_batch,
            "images_per_second": median([r.images_per_second for r in rs]),
            "wall_seconds": median([r.wall_seconds for r in rs]),
            "all_images_per_second": [r.images_per_second for r in rs],
        }
        for name, rs in got.items()
    ]
    single, multi = rows
    summary = {
        "ddp_over_single_images_per_second": ratio(multi["images_per_second"], single["images_per_second"]),
        "ddp_over_single_wall": ratio(multi["wall_seconds"], single["wall_seconds"]),
    }
    table = md_table(
        ["setup", "--batch-size", "img/s", "wall s"],
        [[r["setup"], r["batch_size_flag"], fmt(r["images_per_second"]), fmt(r["wall_seconds"])] for r in rows],
    )
    table += (
        f"\n\nDDP / 1 process: images/s x{fmt(summary['ddp_over_single_images_per_second'], 2)}, "
        f"wall x{fmt(summary['ddp_over_single_wall'], 2)}"
    )
    notes = [
        f"{backbone} finetune on {subset}, --epochs 1, cold cache per run, median of {a.repeats} run(s)",
        f"same global batch: --batch-size {ddp_batch} under torchrun is taken as the global batch (lesionlab splits "
        "it over the ranks); pass --ddp-batch-size if this tree's --batch-size is per process",
        f"torchrun --standalone --nproc-per-node {a.ddp_procs}, gloo on the CPU, OMP_NUM_THREADS={a.ddp_threads} "
        "per process; images/s is what rank 0 wrote to config.json",
        f"on {os.cpu_count()} cores, {a.ddp_procs} processes share the cores one process already uses: "
        "this is DDP's overhead, not a speed-up",
    ]
    record = scenario_record("ddp", "1 process vs DDP under torchrun on the CPU", runs, rows, table, notes)
    record["summary"] = summary
    return record


RUNNERS = {"throughput": throughput, "workers": workers, "memory": memory, "ddp": ddp}


# ------------------------------------------------------------------------------------------------ main


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each option's default (where it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--only", type=csv_list, default=list(SCENARIOS), help=f"Scenarios, comma-separated: {SCENARIOS}.")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "train.json", help="Results file.")
    ap.add_argument("--data", type=Path, default=REPO / "../shared/data/isic-kaggle", help="Real dataset (subset).")
    ap.add_argument("--weights-dir", type=Path, default=REPO / "../shared/weights", help="ImageNet weights folder.")
    ap.add_argument(
        "--backbones", type=csv_list, default=["efficientnet_lite0", "mobilenetv2"], help="throughput: backbones."
    )
    ap.add_argument("--batch-size", type=int, default=32, help="Every run's --batch-size.")
    ap.add_argument("--precision", default="auto", help="fp32, bf16 or auto (passed to every run).")
    ap.add_argument("--repeats", type=int, default=1, help="Runs per configuration (the table shows the median).")
    ap.add_argument("--subset-k", type=int, default=160, help="Training images per class in the subset.")
    ap.add_argument("--subset-k-test", type=int, default=40, help="Test images per class in the subset.")
    ap.add_argument(
        "--subset-dir", type=Path, default=None, help="Subset folder (default: TMP/lesionlab-bench-subset-K-KTEST)."
    )
    ap.add_argument("--baseline-commit", default="de5a399", help="throughput: the baseline's commit.")
    ap.add_argument(
        "--baseline-dir", type=Path, default=Path("/tmp/lesionlab-baseline"), help="throughput: its worktree."
    )
    ap.add_argument(
        "--workers-list",
        type=lambda s: [int(x) for x in csv_list(s)],
        default=[0, 1, 2],
        help="workers: --data-workers values.",
    )
    ap.add_argument("--n", type=int, default=30000, help="memory: generated images.")
    ap.add_argument("--size", type=int, default=384, help="memory: generated image side and --input-size.")
    ap.add_argument("--gen-dir", type=Path, default=None, help="memory: its folder (default: TMP/lesionlab-bench-30k).")
    ap.add_argument("--gen-workers", type=int, default=2, help="memory: processes generating the images.")
    ap.add_argument("--memory-steps", type=int, default=200, help="memory: --max-steps.")
    ap.add_argument("--memory-workers", type=int, default=1, help="memory: --data-workers.")
    ap.add_argument("--memory-checkpointing", action="store_true", help="memory: train with --grad-checkpointing.")
    ap.add_argument(
        "--memory-batch-size",
        type=int,
        default=8,
        help="memory: --batch-size (activations of a 384 px batch of 32 alone peak near 8 GB in fp32 on the CPU).",
    )
    ap.add_argument(
        "--distinct", type=int, default=2000, help="memory: pictures drawn; the other images are copies of them."
    )
    ap.add_argument("--sample-interval", type=float, default=0.5, help="memory: seconds between samples.")
    ap.add_argument("--ddp-procs", type=int, default=2, help="ddp: torchrun's --nproc-per-node.")
    ap.add_argument(
        "--ddp-batch-size", type=int, default=None, help="ddp: torchrun's --batch-size (default: --batch-size)."
    )
    ap.add_argument("--ddp-threads", type=int, default=1, help="ddp: OMP_NUM_THREADS of each process.")
    ap.add_argument("--cache-root", type=Path, default=Path(tempfile.gettempdir()), help="Where caches are made.")
    ap.add_argument("--work", type=Path, default=None, help="Run folders and logs (default: a temp folder, removed).")
    ap.add_argument("--keep-runs", action="store_true", help="Keep the run folders and logs.")
    ap.add_argument("--max-load", type=float, default=0.5, help="Refuse to start above this 1-minute load average.")
    ap.add_argument("--allow-busy", action="store_true", help="Start anyway (the figures are then worthless).")
    args = ap.parse_args(argv)
    unknown = [s for s in args.only if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; choose from {SCENARIOS}")
    args.data, args.weights_dir = args.data.resolve(), args.weights_dir.resolve()
    return args


def machine() -> dict[str, Any]:
    probe = "import torch; print(torch.__version__, torch.get_num_threads())"
    torch_info = subprocess.run([str(PYTHON), "-c", probe], capture_output=True, text=True).stdout.split()
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch_info[0] if torch_info else None,
        "torch_threads": int(torch_info[1]) if len(torch_info) > 1 else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "repo_head": git("rev-parse", "HEAD"),
        "repo_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()[0]
    if load > args.max_load and not args.allow_busy:
        print(
            f"1-minute load average is {load:.2f} (> --max-load {args.max_load}): another job is running. "
            "This bench needs quiet cores; wait, or pass --allow-busy for a smoke test.",
            file=sys.stderr,
        )
        return 2
    check_flags(args.only)
    work = args.work or Path(tempfile.mkdtemp(prefix="lesionlab-bench-runs-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "bench": "bench/train.py",
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": [sys.executable, *sys.argv],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
        "scenarios": {},
    }
    failed = False
    try:
        for name in args.only:
            print(f"\n=== {name} ===", flush=True)
            record = RUNNERS[name](Bench(args, work))
            results["scenarios"][name] = record
            failed |= not record["all_ok"]
            print(f"\n### {name}\n\n{record['table']}\n")
            for note in record["notes"]:
                print(f"- {note}")
            write_json(args.json, results)
    finally:
        results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        write_json(args.json, results)
        if args.keep_runs or args.work:
            print(f"\nrun folders and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nresults: {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
