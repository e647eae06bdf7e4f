"""How `sbx batch` scales with --jobs, and what each concurrent sandbox costs sbx.

    python bench/scale.py [--runs N] [--rounds R] [--user NAME | --as-root]

Started as root, it measures as the unprivileged user `sbxtest`, as overhead.py does.

Throughput: N jobs of `python3 -c "print(1)"` under `strict`, through `sbx batch`
with --jobs 1, 2 and 4, in rounds; runs per second and the ratio to --jobs 1.

Memory: `sbx batch --jobs K` over jobs that sleep, sampled while K sandboxes run.
sbx's own processes are the batch process and, per worker, its warm sandbox (the
zygote, the launcher it keeps ready for the next run) and the running sandbox's init;
the payloads (`sleep`) are not sbx's and are left out. Reported per K: the batch
process's RSS and private memory (USS), the sum of the others' USS and PSS, and per
concurrent sandbox: (their USS + PSS) / K, and the growth of the batch process per
extra sandbox. USS is what the kernel would free if the process ended.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from api_overhead import add_user_options, measure_as
from humaneval import PYTHON, REPO, sbx_command

JOB_COUNTS = (1, 2, 4)


def write_jobs(path: Path, count: int, command: list[str]) -> None:
    with open(path, "w") as f:
        f.writelines(
            json.dumps({"id": n, "command": command}) + "\n" for n in range(count)
        )


def start_batch(jobs_file: Path, out: Path, jobs: int) -> subprocess.Popen:
    out.unlink(missing_ok=True)
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(REPO))
    command = sbx_command() + ["batch", str(jobs_file), "--jobs", str(jobs)]
    command += ["--out", str(out), "--profile", "strict", "--quiet"]
    return subprocess.Popen(
        command, env=env, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def throughput(workdir: Path, runs: int, jobs: int) -> float:
    """Runs per second of `sbx batch --jobs N`, sbx's start-up included."""
    jobs_file, out = workdir / "quick.jsonl", workdir / "quick-out.jsonl"
    write_jobs(jobs_file, runs, [PYTHON, "-c", "print(1)"])
    started = time.perf_counter()
    done = start_batch(jobs_file, out, jobs)
    _, stderr = done.communicate()
    wall = time.perf_counter() - started
    entries = [json.loads(line) for line in out.read_text().splitlines()]
    failed = [e for e in entries if e["verdict"] != "OK"]
    if done.returncode != 0 or len(entries) - len(failed) != runs:
        first = failed[0] if failed else {}
        what = {k: first.get(k) for k in ("id", "verdict", "reason", "error", "stderr")}
        raise SystemExit(
            f"sbx batch --jobs {jobs}: exit {done.returncode}, {len(failed)} not OK "
            f"(first: {what}) {stderr[-500:]}"
        )
    return runs / wall


def memory_kib(pid: int) -> dict[str, int]:
    """Rss, Pss and USS (private clean + dirty) of one process, in KiB."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return {"rss": fields.get("Rss", 0), "pss": fields.get("Pss", 0), "uss": uss}


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def sbx_processes(batch_pid: int) -> list[int]:
    """sbx's processes below the batch process: every descendant but the payloads.
    (Each run's init is the batch process's child, which is their subreaper.)"""
    found, stack = [], children(batch_pid)
    while stack:
        pid = stack.pop()
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm == "sleep":
            continue
        found.append(pid)
        stack += children(pid)
    return found


def running_payloads(batch_pid: int) -> int:
    count, stack = 0, children(batch_pid)
    while stack:
        pid = stack.pop()
        try:
            count += Path(f"/proc/{pid}/comm").read_text().strip() == "sleep"
        except OSError:
            continue
        stack += children(pid)
    return count


def memory_at(workdir: Path, jobs: int) -> dict[str, float]:
    """sbx's memory while `jobs` sandboxes run, in KiB."""
    jobs_file, out = workdir / "sleep.jsonl", workdir / "sleep-out.jsonl"
    write_jobs(jobs_file, jobs, ["sleep", "3"])
    batch = start_batch(jobs_file, out, jobs)
    try:
        deadline = time.monotonic() + 20
        running = 0
        while running < jobs and time.monotonic() < deadline:
            time.sleep(0.1)
            running = running_payloads(batch.pid)
        time.sleep(0.3)
        own = memory_kib(batch.pid)
        others = [memory_kib(pid) for pid in sbx_processes(batch.pid)]
    finally:
        batch.communicate()
    if running != jobs:
        raise SystemExit(f"saw {running} sandboxes running, expected {jobs}")
    return {
        "batch_rss": own["rss"],
        "batch_uss": own["uss"],
        "sbx_uss": sum(m["uss"] for m in others),
        "sbx_pss": sum(m["pss"] for m in others),
    }


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="jobs per batch")
    parser.add_argument("--rounds", type=int, default=3)
    add_user_options(parser)
    args = parser.parse_args()
    measure_as(args)
    with tempfile.TemporaryDirectory(prefix="sbx-scale-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        rates: dict[int, list[float]] = {n: [] for n in JOB_COUNTS}
        for _ in range(args.rounds):
            for n in JOB_COUNTS:
                rates[n].append(throughput(workdir, args.runs, n))
        memory = {n: memory_at(workdir, n) for n in JOB_COUNTS}
    report(rates, memory, args.runs)
    return 0


def report(rates: dict, memory: dict, runs: int) -> None:
    cpus = os.cpu_count()
    print(f"sbx batch, {runs} x python3 -c 'print(1)' under strict, uid {os.getuid()},")
    print(f"{cpus} CPUs; runs/s (median of rounds, min-max), ratio to --jobs 1")
    base = statistics.median(rates[1])
    for n, values in rates.items():
        median = statistics.median(values)
        print(
            f"  --jobs {n}: {median:6.1f} runs/s ({min(values):.1f}-{max(values):.1f})"
            f"  {median / base:.2f}x"
        )
    print("memory of sbx's own processes while K sandboxes sleep (MiB):")
    print(
        f"  {'K':>2} {'batch RSS':>9} {'batch USS':>9} {'sbx USS':>9} {'sbx PSS':>9}"
    )
    for n, m in memory.items():
        row = [
            m[k] / 1024 for k in ("batch_rss", "batch_uss", "sbx_uss", "sbx_pss")
        ]
        print(f"  {n:>2} " + " ".join(f"{v:9.1f}" for v in row))
    first, last = memory[JOB_COUNTS[0]], memory[JOB_COUNTS[-1]]
    extra = JOB_COUNTS[-1] - JOB_COUNTS[0]
    growth = (last["batch_uss"] - first["batch_uss"]) / extra / 1024
    sbx_uss = last["sbx_uss"] / JOB_COUNTS[-1] / 1024
    sbx_pss = last["sbx_pss"] / JOB_COUNTS[-1] / 1024
    print(
        f"per concurrent sandbox: sbx's processes USS {sbx_uss:.1f} MiB "
        f"(PSS {sbx_pss:.1f}), "
        f"batch process growth {growth:.2f} MiB"
    )


if __name__ == "__main__":
    raise SystemExit(main())
