"""Bad input gets one clear line on stderr and a non-zero exit, never a traceback (real CLI, in process)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from hybrid.cli import main


def _run(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err
    return rc, err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("hybrid: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_empty_question(capsys):
    rc, err = _run(capsys, "run", "   ")
    assert rc == 2
    assert "the question is empty" in _error_line(err)


def test_unknown_mode(capsys):
    rc, err = _run(capsys, "run", "hi", "--mode", "turbo")
    assert rc == 2
    assert "mode: got 'turbo'; allowed: 'hybrid', 'diffusion' or 'ar'" in _error_line(err)


def test_unknown_strategy(capsys):
    rc, err = _run(capsys, "run", "hi", "--strategy", "yolo")
    assert rc == 2
    line = _error_line(err)
    assert "planner.commit='yolo' is not valid" in line and "threshold" in line


def test_missing_planner_path(capsys, tmp_path):
    rc, err = _run(capsys, "run", "hi", "--planner-model", str(tmp_path / "nope"), "--quiet")
    assert rc == 2
    assert "planner model path does not exist" in _error_line(err)


def test_unreachable_realizer(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, err = _run(capsys, "run", "hi", "--mode", "ar", "--realizer-url", f"http://127.0.0.1:{port}/v1", "--quiet")
    assert rc == 2
    line = _error_line(err)
    assert "realizer server unreachable" in line and f"127.0.0.1:{port}" in line


def test_question_longer_than_realizer_context(capsys):
    long_q = "7 " * 1500  # 3000 characters (under the 8000 limit), ~3000 tokens: more than the realizer's context
    rc, err = _run(capsys, "run", long_q, "--quiet", "--mode", "ar", "--max-tokens", "2000")
    assert rc == 2
    line = _error_line(err)
    assert "exceeds" in line and "realizer's context of 2048" in line


def test_question_longer_than_planner_context(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_question_chars: 100000\n")
    long_q = "7 " * 9000  # ~9000 tokens > the planner's 8192-token context
    rc, err = _run(capsys, "run", long_q, "--quiet", "--mode", "diffusion", "--config", str(cfg))
    assert rc == 2
    assert "the planner's context leaves room for" in _error_line(err)


def test_question_over_char_limit(capsys):
    rc, err = _run(capsys, "run", "x" * 9000)
    assert rc == 2
    assert "characters; the limit is 8000" in _error_line(err)


def test_console_script_exit_code():
    p = subprocess.run([sys.executable, "-m", "hybrid.cli", "run", ""], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip() == "hybrid: error: the question is empty"


@pytest.mark.parametrize("cmd", ["graph"])
def test_graph_prints_mermaid(capsys, cmd):
    assert main([cmd]) == 0
    out = capsys.readouterr().out
    for node in ("plan", "score", "revise", "realize"):
        assert node in out
    assert out.lstrip().startswith(("graph", "---", "%%"))


def test_delegated_subcommands_keep_leading_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--help"])
    assert e.value.code == 0
    assert "--limit" in capsys.readouterr().out
