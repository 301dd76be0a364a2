"""Start `vllm serve <checkpoint>` (the plugin serves any projector; no extra server code),
wait until it answers, stop it cleanly.

    with Server(ckpt, engine={"max_num_seqs": 32}) as server:
        print(server.base_url)        # http://127.0.0.1:<port>/v1

The server binds to 127.0.0.1 only. Its output goes to `<log_dir>/vllm-serve-<port>.log`;
if it exits or is not healthy in time, the error quotes the end of that log.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from experiments.serving.engine import cli_flags, engine_kwargs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# keys of the `serve` config that are about the server process, not the engine
SERVER_KEYS = ("name", "port", "startup_timeout_s")


def serve_args(model_dir: Path, port: int, engine: dict[str, Any]) -> list[str]:
    """The `vllm serve` command line: the offline engine's arguments (engine.engine_kwargs,
    with the `serve` config's knobs) as flags, bound to loopback."""
    vllm = shutil.which("vllm", path=str(Path(sys.executable).parent)) or "vllm"
    knobs = {k: v for k, v in engine.items() if k not in SERVER_KEYS}
    return [vllm, "serve", *cli_flags(engine_kwargs(model_dir, **knobs)), "--host", "127.0.0.1", "--port", str(port)]


class ServerError(RuntimeError):
    """The server did not come up; `cause` is the root cause found in its log."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


def root_cause(log: str) -> str | None:
    """The first `SomeError: message` line of a vLLM log: the worker's own exception (e.g.
    "NotImplementedError: FP8 KV cache on CPU requires x86 with AVX-512 or AMX."), which
    the engine then wraps in generic "initialization failed" errors further down."""
    for line in log.splitlines():
        if m := re.search(r"\b(\w+(?:Error|Exception)): (.+)$", line):
            return f"{m.group(1)}: {m.group(2).strip()}"
    return None


class Server:
    def __init__(self, model_dir: str | Path, engine: dict[str, Any] | None = None,
                 log_dir: str | Path = "outputs/serve", startup_timeout_s: float = 300) -> None:
        self.model_dir = Path(model_dir)
        self.engine = dict(engine or {})
        self.port = self.engine.get("port") or free_port()
        self.log_path = Path(log_dir) / f"vllm-serve-{self.port}.log"
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def failed(self, what: str) -> ServerError:
        """The error for a server that did not come up: `what` happened, the log's root cause."""
        try:
            cause = root_cause(self.log_path.read_text(errors="replace")) or "no error in the log"
        except FileNotFoundError:
            cause = "no log"
        return ServerError(f"vllm serve {what}: {cause}; log {self.log_path}:\n{self.log_tail()}", cause)

    def start(self) -> Server:
        from qwen2_audio_vllm.checkpoint import validate_checkpoint

        validate_checkpoint(self.model_dir)  # clear errors before a process starts
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        args = serve_args(self.model_dir, self.port, self.engine)  # on CPU, also sets the thread binding
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.failed(f"exited with code {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1)
        self.stop()
        raise self.failed(f"not healthy after {self.startup_timeout_s} s")

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
