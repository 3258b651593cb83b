"""Serve a local teacher with `mlx_lm.server` on loopback: start it, wait for /health, stop it.

The server runs in its own process with `HF_HUB_OFFLINE=1` and, on Linux, with the OpenBLAS
that `mlx_student` loaded preloaded (`LD_PRELOAD`), so it runs at OpenBLAS speed too.

    with serve("models/smollm2-135m-instruct") as server:
        print(server.url)  # http://127.0.0.1:<free port>
"""

import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

import mlx_student


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log_path: Path


def free_port(host="127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path, n=20):
    """The last `n` lines of the server's log, without its /health access lines."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines(True)
    except OSError:
        return ""
    return "".join([line for line in lines if '"GET /health' not in line][-n:])


def start(model, log_path, host="127.0.0.1", port=None, max_tokens=512) -> Server:
    """Start `mlx_lm.server --model MODEL` in the background; its output goes to `log_path`."""
    port = port or free_port(host)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if mlx_student.BLAS:
        env["LD_PRELOAD"] = mlx_student.BLAS
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model),
           "--host", host, "--port", str(port), "--max-tokens", str(max_tokens)]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return Server(process, f"http://{host}:{port}", log_path)


def wait_healthy(server: Server, timeout=120.0):
    """Poll GET /health until it answers 200; raise with the server's log if it exits,
    answers 503 (its generation thread died) or is not up in `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"mlx_lm.server exited with code {server.process.returncode}; "
                f"last lines of {server.log_path}:\n{_tail(server.log_path)}"
            )
        try:
            status = httpx.get(f"{server.url}/health", timeout=2.0).status_code
        except httpx.TransportError:
            status = None
        if status == 200:
            return
        if status == 503:  # up, but its generation thread died (e.g. the model did not load)
            stop(server)
            raise RuntimeError(
                f"mlx_lm.server at {server.url} is up but unhealthy (503); last lines of "
                f"{server.log_path}:\n{_tail(server.log_path)}"
            )
        time.sleep(0.25)
    stop(server)
    raise TimeoutError(
        f"mlx_lm.server at {server.url} not healthy after {timeout:.0f} s; "
        f"last lines of {server.log_path}:\n{_tail(server.log_path)}"
    )


def stop(server: Server, timeout=10.0):
    """Terminate the server (SIGTERM, then SIGKILL after `timeout` seconds)."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@contextlib.contextmanager
def serve(model, log_path=None, host="127.0.0.1", port=None, timeout=120.0, max_tokens=512):
    """Start a server, wait until it is healthy, yield it, and always stop it."""
    log_path = log_path or Path(model).with_name(Path(model).name + ".server.log")
    server = start(model, log_path, host, port, max_tokens)
    try:
        wait_healthy(server, timeout)
        yield server
    finally:
        stop(server)
