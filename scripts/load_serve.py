"""Load check of mlx_student.serve: N concurrent chat requests on loopback, every one accounted for.

    python scripts/load_serve.py                       # 256 at once against a tiny random student
    python scripts/load_serve.py --model runs/pilot --requests 512 --max-queue 128
    python scripts/load_serve.py --url http://127.0.0.1:8080   # a server already running
    python scripts/load_serve.py --peer                # then the same load on mlx_lm.server

Starts `python -m runtime.server` (a real process on a free loopback port) unless --url is
given, opens --requests connections at once (all in flight together) and sorts every outcome:

    answered  HTTP 200 with a completion
    refused   HTTP 429/503 with a Retry-After header (the bounded queue was full)
    errors    any other HTTP status (with a JSON error body)
    dropped   no HTTP answer at all: reset, closed or timed-out connections (goal: 0)

and prints the counts with p50 / p95 latency (seconds from send to the full answer). Bounded
in count (--requests) and time (--timeout per request, --deadline for the whole run). Exits 1
if any request was dropped.
"""

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402


def tiny_student() -> str:
    """A random tiny student (configs/tiny.yaml, the teacher's tokenizer), built once."""
    path = ROOT / "artifacts/load/tiny"
    if not (path / "config.json").exists():
        import mlx_student  # noqa: F401  (first: OpenBLAS on Linux)
        from mlx_lm.utils import load_tokenizer

        from mlx_student import model as student_model
        from mlx_student.config import load_config

        config = load_config(ROOT / "configs/tiny.yaml")
        tokenizer = load_tokenizer(ROOT / "models/smollm2-135m-instruct")
        student_model.save(path, student_model.build(config, seed=0), config, tokenizer)
    return str(path)


def start_server(model, max_queue, extra):
    """The server as its own process on a free port; returns (process, base url)."""
    cmd = [sys.executable, "-m", "runtime.server", "--model", model, "--port", "0",
           "--max-queue", str(max_queue), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=sys.stderr, text=True, env=env, cwd=ROOT)
    line = proc.stdout.readline()
    found = re.search(r"http://([\d.]+):(\d+)", line)
    if not found:
        proc.kill()
        sys.exit(f"the server did not start: {line.strip() or 'no output'} (exit {proc.wait()})")
    return proc, f"http://{found.group(1)}:{found.group(2)}"


def start_peer(model):
    """mlx_lm.server on the same model, on a free port, once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm.server", "--model", model, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, tic = f"http://127.0.0.1:{port}", time.monotonic()
    while time.monotonic() - tic < 300:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(1)
        if proc.poll() is not None:
            break
    proc.kill()
    sys.exit(f"mlx_lm.server did not start (exit {proc.poll()})")


async def one(client, url, body, timeout):
    tic = time.perf_counter()
    try:
        r = await client.post(url + "/v1/chat/completions", json=body, timeout=timeout)
    except httpx.HTTPError as e:
        return "dropped", time.perf_counter() - tic, type(e).__name__
    elapsed = time.perf_counter() - tic
    if r.status_code == 200:
        return ("answered" if r.json()["choices"] else "errors"), elapsed, None
    if r.status_code in (429, 503) and r.headers.get("retry-after"):
        return "refused", elapsed, r.headers["retry-after"]
    return "errors", elapsed, f"HTTP {r.status_code}: {r.text[:120]}"


async def load(url, n, max_tokens, timeout, deadline):
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits) as client:
        bodies = [{"messages": [{"role": "user", "content": f"Request {i}: say something."}],
                   "max_tokens": max_tokens, "temperature": 1.0, "seed": i} for i in range(n)]
        tasks = [asyncio.ensure_future(one(client, url, b, timeout)) for b in bodies]
        done, pending = await asyncio.wait(tasks, timeout=deadline)
        for t in pending:
            t.cancel()
        return [t.result() for t in done] + [("dropped", deadline, "past the deadline")] * len(pending)


def table(results, wall, title):
    print(f"\n{title}")
    rows = []
    for kind in ("answered", "refused", "errors", "dropped"):
        times = np.array([t for k, t, _ in results if k == kind])
        p50, p95 = (np.percentile(times, 50), np.percentile(times, 95)) if times.size else (np.nan, np.nan)
        rows.append({"outcome": kind, "count": int(times.size), "p50_s": round(float(p50), 3),
                     "p95_s": round(float(p95), 3)})
    print("| outcome | count | p50 s | p95 s |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['outcome']} | {r['count']} | {r['p50_s']} | {r['p95_s']} |")
    print(f"{len(results)} requests in {wall:.1f} s")
    notes = sorted({str(note) for k, _, note in results if k in ("errors", "dropped") and note})
    for note in notes[:5]:
        print(f"  e.g. {note}")
    return rows


def build_parser():
    p = argparse.ArgumentParser(description="Concurrent-request load check of mlx_student.serve "
                                            "(answered / refused / errors / dropped, p50 / p95 latency).")
    p.add_argument("--model", help="model folder to serve (default: a random tiny student)")
    p.add_argument("--url", help="an already running server (then --model and --max-queue are unused)")
    p.add_argument("--requests", type=int, default=256, help="requests, all sent at once")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=64, help="the started server's --max-queue")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--deadline", type=float, default=600.0, help="seconds for the whole run")
    p.add_argument("--peer", action="store_true", help="then run the same load against mlx_lm.server")
    p.add_argument("--json", help="also write the table(s) here")
    return p


def run(args, start, title):
    """One load run against the server `start()` returns as (process or None, url)."""
    proc, url = start()
    try:
        tic = time.perf_counter()
        results = asyncio.run(load(url, args.requests, args.max_tokens, args.timeout, args.deadline))
        wall = time.perf_counter() - tic
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    return {"server": title, "wall_s": wall, "rows": table(results, wall, title)}


def main(argv=None):
    args = build_parser().parse_args(argv)
    model = args.model or (None if args.url else tiny_student())
    if args.url:
        runs = [run(args, lambda: (None, args.url), args.url)]
    else:
        runs = [run(args, lambda: start_server(model, args.max_queue, []),
                    f"mlx_student.serve --max-queue {args.max_queue}")]
    if args.peer:
        if model is None:
            sys.exit("--peer needs --model (or no --url) to know what mlx_lm.server should load")
        runs.append(run(args, lambda: start_peer(model), "mlx_lm.server"))
    if args.json:
        Path(args.json).write_text(json.dumps({"requests": args.requests, "runs": runs}, indent=1))
    dropped = {r["server"]: next(x["count"] for x in r["rows"] if x["outcome"] == "dropped") for r in runs}
    print("\ndropped: " + ", ".join(f"{k} {v}" for k, v in dropped.items()))
    return 1 if dropped[runs[0]["server"]] else 0


if __name__ == "__main__":
    sys.exit(main())
