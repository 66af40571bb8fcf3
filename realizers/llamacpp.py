"""The one place that loads llama.cpp models: settings that survive this CPU, decided once per machine.

llama.cpp's CPU backend places weights in "extra buffer types" (AMX tiles, repacked Q4/Q8 layouts) when the
CPU offers them. On some x86-64 CPUs that path crashes the process in the first decode (SIGSEGV in
`ggml_backend_amx_mul_mat`, ggml-org/llama.cpp issue 20824), and on others it is the fast path. So every
llama.cpp load in this project goes through `load_llama` / `model_params`, which set
`llama_model_params.use_extra_bufts` from, in order:

1. the explicit argument (`"on"` / `"off"`; config field `realizer.extra_bufts`),
2. the environment, `HYBRID_LLAMA_EXTRA_BUFTS=on|off|auto`,
3. `auto`: a probe that loads the model with extra buffer types in a **child process** and decodes a prompt
   and a few tokens there. If the child survives, extra buffer types are on; if it dies (any signal, or a
   non-zero exit), they are off and a warning names the CPU features and the setting. The verdict is kept in
   the cache directory (`$HYBRID_CACHE_DIR`, default `~/.cache/hybrid`), keyed by CPU model, llama.cpp's
   CPU feature line, the llama-cpp-python version and the model file, so the probe runs once per machine.

Weight types (`weights_file`, config field `realizer.weights`): a GGUF can be run at another weight type than the
one it ships with; the copy is made once by llama.cpp's own quantiser (`llama_model_quantize`, requantising) into
`<cache>/realizer-gguf/`, keyed by the source file and the llama-cpp-python version, written to a temporary file
and renamed. Which type is fastest depends on llama.cpp's CPU kernels: on AVX2 it has batched (GEMM) paths for
Q8_0 and, repacked, Q4_0, and none for Q4_1 (benchmarks/README.md, "Server").

`run_child` / `ProbeResult` are the crash-isolation tools (also used by the test suite so that a native crash
fails one test instead of killing the run). This module imports no model framework besides llama_cpp, and
llama_cpp only when a function needs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

ExtraBufts = Literal["auto", "on", "off"]
ENV = "HYBRID_LLAMA_EXTRA_BUFTS"
_TRUE = {"on", "1", "true", "yes"}
_FALSE = {"off", "0", "false", "no"}
_LOAD_LOCK = threading.Lock()  # serialises loads that set model params (see `load_llama`)
_VERDICTS: dict[str, bool] = {}  # per process: key -> verdict (the cache file is the cross-process copy)


# ----------------------------------------------------------------------------- what this CPU is


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo; `platform.processor()` elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def system_info() -> str:
    """llama.cpp's own CPU feature line (`AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 | ...`); safe: decodes nothing."""
    try:
        import llama_cpp

        raw = llama_cpp.llama_print_system_info()
        return (raw.decode() if isinstance(raw, bytes) else str(raw)).strip()
    except Exception as e:  # noqa: BLE001 - informational only
        return f"(llama.cpp system info unavailable: {type(e).__name__})"


def cpu_flags_summary() -> str:
    """The features that decide the extra-buffer path, for messages: 'AMX_INT8 = 1 | AVX512 = 1 | REPACK = 1'."""
    parts = [p.strip() for p in system_info().replace("CPU :", "|").split("|")]
    keep = [p for p in parts if p.split(" =")[0] in ("AMX_INT8", "AVX512", "AVX512_BF16", "AVX2", "REPACK")]
    return " | ".join(keep) or system_info()


# ----------------------------------------------------------------------------- crash isolation


@dataclass
class ProbeResult:
    """How a child process ended."""

    ok: bool
    returncode: int | None  # None: timed out
    signal: str | None  # "SIGSEGV" when killed by a signal
    seconds: float
    stderr_tail: str

    @property
    def crashed(self) -> bool:
        return self.signal is not None

    def describe(self) -> str:
        if self.ok:
            return f"ok in {self.seconds:.1f} s"
        if self.returncode is None:
            return f"timed out after {self.seconds:.0f} s"
        how = f"killed by {self.signal}" if self.signal else f"exit status {self.returncode}"
        tail = self.stderr_tail.strip().splitlines()[-3:]
        return how + (f" ({' / '.join(tail)})" if tail else "")


def run_child(code: str, *, timeout: float = 180.0, env: dict[str, str] | None = None) -> ProbeResult:
    """Run `python -c code` in a child process: a native crash there ends only the child."""
    t0 = time.perf_counter()
    child_env = {**os.environ, **(env or {}), "PYTHONFAULTHANDLER": "1"}
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=child_env)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode("utf-8", "replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return ProbeResult(False, None, None, time.perf_counter() - t0, err[-2000:])
    sig = None
    if p.returncode < 0:
        with contextlib.suppress(ValueError):
            sig = signal.Signals(-p.returncode).name
        sig = sig or f"signal {-p.returncode}"
    return ProbeResult(p.returncode == 0, p.returncode, sig, time.perf_counter() - t0, p.stderr[-2000:])


_PROBE = """
from realizers.llamacpp import load_llama
llm = load_llama({path!r}, extra_bufts={setting!r}, n_ctx=256, n_threads=1)
out = llm.create_completion("The capital of France is", max_tokens=8, temperature=0.0)  # a prompt batch + 8 decodes
assert isinstance(out["choices"][0]["text"], str)
print("ok")
"""


def probe(path: str | os.PathLike, extra_bufts: bool, *, timeout: float = 180.0) -> ProbeResult:
    """Load `path` with extra buffer types on/off and decode a prompt and 8 tokens, in a child process."""
    root = str(Path(__file__).resolve().parent.parent)  # so the child imports this checkout's `realizers`
    env = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    return run_child(_PROBE.format(path=str(path), setting="on" if extra_bufts else "off"), timeout=timeout, env=env)


def crash_message(result: ProbeResult, *, extra_bufts: bool, what: str = "a llama.cpp decode") -> str:
    """One paragraph that says what died, on which CPU, and which setting avoids it."""
    if extra_bufts:
        fix = (
            f"Set {ENV}=off (config: realizer.extra_bufts: off) to load without llama.cpp's extra buffer types "
            "(AMX / weight repacking; ggml-org/llama.cpp issue 20824)."
        )
    else:
        fix = (
            f"It crashed with extra buffer types already off, so that setting does not avoid it; {ENV}=on is the "
            "other setting to try, and the crash is llama.cpp's on this CPU."
        )
    return (
        f"{what} with use_extra_bufts={'on' if extra_bufts else 'off'} failed in a child process: "
        f"{result.describe()}. CPU: {cpu_model()}; llama.cpp features: {cpu_flags_summary()}. {fix}"
    )


# ----------------------------------------------------------------------------- the decision


def cache_dir() -> Path:
    """hybrid's cache directory: `$HYBRID_CACHE_DIR`, else `$XDG_CACHE_HOME/hybrid`, else `~/.cache/hybrid` (the
    same rule as `planners.assets.cache_dir`, which this package does not import)."""
    root = os.environ.get("HYBRID_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hybrid"


def _cache_file() -> Path:
    return cache_dir() / "llama-extra-bufts.json"


def _key(path: str | os.PathLike) -> str:
    import llama_cpp

    p = Path(path)
    size = p.stat().st_size if p.exists() else 0
    raw = f"{cpu_model()}|{system_info()}|{getattr(llama_cpp, '__version__', '?')}|{p.name}:{size}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _setting(value: str | bool | None) -> ExtraBufts:
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "on" if value else "off"
    v = str(value).strip().lower()
    if v in _TRUE:
        return "on"
    if v in _FALSE:
        return "off"
    if v in ("", "auto"):
        return "auto"
    raise ValueError(f"extra_bufts={value!r} is not valid; choose one of: auto, on, off")


def resolve_extra_bufts(path: str | os.PathLike, setting: str | bool | None = None) -> bool:
    """Whether to load `path` with llama.cpp's extra buffer types: argument > $HYBRID_LLAMA_EXTRA_BUFTS > probe."""
    chosen = _setting(setting)
    if chosen == "auto":
        chosen = _setting(os.environ.get(ENV))
    if chosen != "auto":
        return chosen == "on"
    key = _key(path)
    if key in _VERDICTS:
        return _VERDICTS[key]
    cache = _cache_file()
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(cache.read_text())
        if key in known:
            _VERDICTS[key] = bool(known[key]["extra_bufts"])
            return _VERDICTS[key]
    result = probe(path, True)
    verdict = result.ok
    if not verdict:
        log.warning("%s Using extra buffer types off.", crash_message(result, extra_bufts=True))
    _VERDICTS[key] = verdict
    if result.returncode is None:  # timed out (a busy machine is no verdict): off now, probe again next process
        return verdict
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(cache.read_text()) if cache.exists() else {}
        known[key] = {
            "extra_bufts": verdict,
            "cpu": cpu_model(),
            "features": cpu_flags_summary(),
            "model": Path(path).name,
            "probe": asdict(result),
        }
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(cache)
    return verdict


def model_params(path: str | os.PathLike, extra_bufts: str | bool | None = None, **fields: Any):
    """A `llama_model_params` for llama.cpp's low-level API (`llama_model_load_from_file`), extra buffer types
    decided by `resolve_extra_bufts`; `fields` set any other member (n_gpu_layers, use_mmap, ...)."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = resolve_extra_bufts(path, extra_bufts)
    for name, value in fields.items():
        setattr(params, name, value)
    return params


def load_llama(path: str | os.PathLike, *, extra_bufts: str | bool | None = None, **kwargs: Any):
    """`llama_cpp.Llama(model_path=path, verbose=False, **kwargs)` with extra buffer types decided here.

    llama-cpp-python's `Llama` takes no argument for `use_extra_bufts`: it builds its model parameters from
    `llama_model_default_params()`. For the duration of this call (under a lock, so concurrent loads through
    this function cannot interleave) that factory returns parameters with the member set, then is restored."""
    import llama_cpp
    import llama_cpp.llama_cpp as ll

    use = resolve_extra_bufts(path, extra_bufts)
    kwargs.setdefault("verbose", False)
    with _LOAD_LOCK:
        original = ll.llama_model_default_params

        def defaults():
            params = original()
            params.use_extra_bufts = use
            return params

        ll.llama_model_default_params = defaults
        try:
            llm = llama_cpp.Llama(model_path=str(path), **kwargs)
        finally:
            ll.llama_model_default_params = original
    llm.hybrid_extra_bufts = use  # what was used, for benchmarks and messages
    return llm


# ----------------------------------------------------------------------------- weight types


Weights = Literal["auto", "q4_1", "q8_0", "q4_0"]
WEIGHTS: tuple[str, ...] = ("auto", "q4_1", "q8_0", "q4_0")
_FTYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7}  # llama_ftype values (llama.h)
CONVERT_VERSION = 1  # bump when the conversion changes: invalidates converted files in the cache


def converted_path(src: str | os.PathLike, weights: str) -> Path:
    """Where the `weights` copy of `src` lives in the cache: keyed by the source's name, size, mtime and first MiB,
    and by llama-cpp-python's version (its quantiser made the file)."""
    import llama_cpp

    src = Path(src)
    st = src.stat()
    h = hashlib.sha256(f"v{CONVERT_VERSION}|{src.name}|{st.st_size}|{st.st_mtime_ns}|{llama_cpp.__version__}".encode())
    with open(src, "rb") as f:
        h.update(f.read(1 << 20))
    return cache_dir() / "realizer-gguf" / f"{src.stem}-{h.hexdigest()[:16]}-{weights}.gguf"


def convert_weights(
    src: str | os.PathLike, dst: str | os.PathLike, weights: str, *, threads: int | None = None
) -> Path:
    """`src` requantised to `weights` by llama.cpp's own quantiser (`llama_model_quantize`, `allow_requantize`: the
    source may already be quantised; every tensor is dequantised to float and quantised again, tensors llama.cpp
    keeps at another type, such as an embedding that is already q8_0, are copied). Written to a temporary file
    beside `dst`, then renamed: a reader never sees half a file. Raises RuntimeError when llama.cpp fails."""
    import llama_cpp
    from llama_cpp._logger import set_verbose

    if weights not in _FTYPES:
        raise ValueError(f"weights={weights!r}: llama.cpp converts to one of {', '.join(sorted(_FTYPES))}")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    set_verbose(False)  # llama-cpp-python's log filter: no per-tensor lines
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _FTYPES[weights]
    params.allow_requantize = True
    params.nthread = threads or max(1, (os.cpu_count() or 2) // 2)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0 or not tmp.exists():
            raise RuntimeError(f"llama_model_quantize({src} -> {weights}) failed with status {rc}")
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def weights_file(src: str | os.PathLike, weights: str, *, progress: Any = None, threads: int | None = None) -> Path:
    """The GGUF to load for `src` at weight type `weights` (not "auto": the caller resolves it): `src` itself when
    it already has that type (its header's `general.file_type`), else a copy converted once into the cache
    directory (`convert_weights`), announced through `progress` (a callable taking one line; default: the log)."""
    from realizers.gguf_weights import gguf_file_type

    if weights not in _FTYPES:
        raise ValueError(f"weights={weights!r} is not valid here; choose one of: {', '.join(sorted(_FTYPES))}")
    src = Path(src)
    have = gguf_file_type(src)
    if have == weights:
        return src
    dst = converted_path(src, weights)
    if dst.exists():
        return dst
    say = progress or log.warning
    say(
        f"converting the realizer's weights {have} -> {weights} with llama.cpp's quantiser, once (seconds), into "
        f"{dst.parent} ..."
    )
    t0 = time.perf_counter()
    try:
        convert_weights(src, dst, weights, threads=threads)
    except (RuntimeError, OSError) as e:
        as_is = have if have in WEIGHTS else "auto"  # auto runs a GGUF of your own as it is
        raise RuntimeError(
            f"could not convert {src.name} ({have}) to {weights} in {dst.parent}: {e}. Set realizer.weights to "
            f"{as_is} to load the file as it is, or free space / fix permissions in the cache directory "
            "($HYBRID_CACHE_DIR)."
        ) from e
    say(f"converted {src.name} to {weights} in {time.perf_counter() - t0:.1f} s ({dst.stat().st_size / 2**20:.0f} MiB)")
    return dst
