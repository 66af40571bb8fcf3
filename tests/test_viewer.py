"""The trajectory viewer: a page generated from a real (tiny) run, checked as data and in headless Chromium
(Debian's package; `.ci/prepare_chromium.sh` installs it): the page renders, `#step=N` opens step N, moving the
slider and pressing play change the shown step (read back from the DOM), and a screenshot is drawn.

Without a chromium binary the browser tests skip, unless HYBRID_REQUIRE_CHROMIUM=1 (CI), where they fail."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from hybrid import viewer
from planners.trajectory import Trajectory, TrajectoryStep

QUESTION = "How do I boil an egg? </script><script>alert('x')</script>"
AR_ANSWER = "Put the egg in boiling water for nine minutes, then cool it in cold water."


@pytest.fixture(scope="module")
def run(tiny_planner):
    """A real plan from the tiny planner (its trajectory) dressed as a hybrid run's final state."""
    res = tiny_planner.plan("How do I boil an egg?")
    state = {
        "question": QUESTION,
        "mode": "hybrid",
        "plan": res.text,
        "answer": AR_ANSWER,
        "trajectory": res.trajectory.to_dict(),
        "tse": 1.25,
        "revisions": 0,
        "timings": {"plan_ms": 120.0, "ttft_ms": 300.0, "total_ms": 900.0, "started_at": 1.7e9},
    }
    return res, state


@pytest.fixture(scope="module")
def page(run, tiny_planner, tmp_path_factory):
    res, state = run
    path = viewer.write_viewer(state, tiny_planner, tmp_path_factory.mktemp("viewer") / "run.html")
    return path, res.trajectory


def _data(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', html, re.S)
    assert m, "no data island"
    return json.loads(m.group(1))


def committed_by(traj: Trajectory, step: int) -> int:
    """Positions unmasked after `step` steps (the tiny sampler never remasks)."""
    return sum(len(s.committed) for s in traj.steps[:step])


# ----------------------------------------------------------------------------------------------- data
def test_page_is_self_contained_and_injection_safe(page):
    path, traj = page
    html = path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing fetched from a network
    assert "<link" not in html and "<script src" not in html
    # the question's </script> stays text: exactly the page's own two script blocks close
    assert html.count("</script>") == 2
    assert "&lt;/script&gt;&lt;script&gt;alert" in html  # the escaped title
    d = _data(html)
    assert d["question"] == QUESTION and d["traj"]["T"] == len(traj.steps) and d["traj"]["G"] == traj.gen_length
    for row in d["traj"]["shown"] + d["traj"]["guess"]:
        assert all(t == -1 or str(t) in d["pieces"] for t in row)
    assert d["ar"]["source"] == "AR answer" and "".join(d["ar"]["pieces"]).strip() == AR_ANSWER
    assert d["arness"]["commits"] == traj.gen_length or d["arness"]["commits"] <= traj.gen_length


def test_replay_matches_the_trajectory(page):
    _, traj = page
    r = viewer.replay(traj.to_dict())
    assert r["shown"][0] == [-1] * traj.gen_length  # a fresh plan starts all masked
    for s in range(r["T"] + 1):
        done = sum(t >= 0 for t in r["shown"][s])
        assert done == committed_by(traj, s) or (s == r["T"] and done == traj.gen_length)
        assert all(r["guess"][s][p] == -1 for p in range(r["G"]) if r["shown"][s][p] >= 0)
    assert r["shown"][-1] == traj.final  # ends on the final tokens
    assert r["committed"][1:] == [sorted(s.committed) for s in traj.steps]


def test_replay_remask_and_fixed_positions():
    steps = [
        TrajectoryStep(0, 0, [0, 1], [0.9, 0.4], [5, 6, 7, 8], remasked=[], masked_after=2),
        TrajectoryStep(1, 0, [2], [0.8], [5, 6, 7, 8], remasked=[1], masked_after=2),
        TrajectoryStep(2, 0, [1, 3], [0.7, 0.6], [5, 9, 7, 8], remasked=[], masked_after=0),
    ]
    t = Trajectory(3, 4, 99, steps, final=[5, 9, 7, 8], nfe=3)
    r = viewer.replay(t.to_dict())
    assert r["shown"][1] == [5, 6, -1, -1] and r["conf"][1][:2] == [0.9, 0.4]
    assert r["shown"][2] == [5, -1, 7, -1] and r["conf"][2][1] is None  # remasked after step 2's commit
    assert r["shown"][3] == [5, 9, 7, 8]
    # a redraw: only positions 1 and 3 were masked; the rest show their fixed tokens from the start
    redraw = Trajectory(
        3, 4, 99, [TrajectoryStep(0, 0, [1, 3], [0.5, 0.5], [5, 6, 7, 8], masked_after=0)], [5, 6, 7, 8], 1
    )
    assert viewer.replay(redraw.to_dict())["shown"][0] == [5, -1, 7, -1]


def test_inputs_it_accepts(run, tiny_planner, tmp_path):
    res, state = run
    traj = res.trajectory
    # a Trajectory, its dict, a pretokenised mapping, a callable; an AR-mode state without trajectory
    viewer.write_viewer(traj, tiny_planner.tokenizer, tmp_path / "a.html")
    pieces = {i: f"<{i}>" for i in set(traj.final)}
    d = _data(viewer.write_viewer(traj.to_dict(), pieces, tmp_path / "b.html").read_text())
    assert d["ar"]["source"].startswith("the diffusion's final tokens")
    d = _data(viewer.write_viewer(state, lambda ids: "w", tmp_path / "c.html", ar_answer="one two three").read_text())
    assert d["ar"]["pieces"] == ["one", " two", " three"]  # no tokenizer: words
    ar_state = {"question": "q", "mode": "ar", "answer": "Just the answer.", "trajectory": None}
    d = _data(viewer.write_viewer(ar_state, tiny_planner, tmp_path / "d.html").read_text())
    assert d["traj"] is None and d["ar"]["pieces"]
    with pytest.raises(TypeError, match="cannot decode tokens"):
        viewer.write_viewer(traj, 42, tmp_path / "e.html")


def test_cli_view(run, tmp_path, capsys):
    _, state = run
    src = tmp_path / "run.json"
    src.write_text(json.dumps(state))
    assert viewer.main([str(src)]) == 0  # SmolLM2's tokenizer by default
    out = src.with_suffix(".html")
    assert capsys.readouterr().out.strip() == str(out)
    assert _data(out.read_text())["traj"]["G"] == state["trajectory"]["gen_length"]
    assert viewer.main([str(src), "-o", str(tmp_path / "x" / "y.html")]) == 0 and (tmp_path / "x" / "y.html").exists()
    assert viewer.main([str(tmp_path / "missing.json")]) == 2
    (tmp_path / "bad.json").write_text("{not json")
    assert viewer.main([str(tmp_path / "bad.json")]) == 2
    (tmp_path / "empty.json").write_text("{}")
    assert viewer.main([str(tmp_path / "empty.json")]) == 2
    assert "neither a trajectory nor an answer" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def chromium():
    for name in (os.environ.get("HYBRID_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (found := shutil.which(name)):
            return found
    reason = "no chromium binary on PATH (install it with .ci/prepare_chromium.sh, or set HYBRID_CHROMIUM)"
    if os.environ.get("HYBRID_REQUIRE_CHROMIUM") == "1":
        pytest.fail(reason + "; HYBRID_REQUIRE_CHROMIUM=1 requires it")
    pytest.skip(reason)


def _browser(binary: str, url: str, *extra: str) -> str:
    with tempfile.TemporaryDirectory(prefix="hybrid-chromium-") as profile:
        cmd = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *extra,
            url,
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def dom(binary: str, path: Path, fragment: str) -> dict:
    """The page's DOM after its script ran, with the step shown and what each lane displays."""
    html = _browser(binary, f"{path.as_uri()}#{fragment}", "--virtual-time-budget=8000", "--dump-dom")

    def attr(el_id: str, name: str) -> str:
        m = re.search(rf'id="{el_id}"[^>]*\b{name}="([^"]*)"', html) or re.search(
            rf'\b{name}="([^"]*)"[^>]*id="{el_id}"', html
        )
        assert m, f"no {name} on #{el_id}"
        return m.group(1)

    lane = html.split('id="diff-lane"', 1)[1].split("</div>", 1)[0]
    ar_lane = html.split('id="ar-lane"', 1)[1].split("</div>", 1)[0]
    return {
        "body_step": int(re.search(r'<body[^>]*data-step="(\d+)"', html).group(1)),
        "step_num": int(re.search(r'id="step-num">(\d+)<', html).group(1)),
        "diff_step": int(attr("diff-lane", "data-step")),
        "committed": len(re.findall(r'class="tok (?:committed|filled)', lane)),
        "new": len(re.findall(r'class="tok committed new', lane)),
        "masked": len(re.findall(r'class="tok masked', lane)),
        "ar_shown": len(re.findall(r'class="tok ar shown', ar_lane)),
        "diff_stat": re.search(r'id="diff-stat">([^<]*)<', html).group(1),
    }


def test_browser_renders_and_the_slider_moves_the_step(chromium, page):
    path, traj = page
    T, G = len(traj.steps), traj.gen_length
    n_ar = len(_data(path.read_text())["ar"]["pieces"])
    seen = {}
    for step in (0, 3, T):
        d = dom(chromium, path, f"step={step}")
        seen[step] = d
        assert d["body_step"] == d["step_num"] == d["diff_step"] == step
        assert d["committed"] == committed_by(traj, step) and d["committed"] + d["masked"] == G
        assert d["new"] == (len(traj.steps[step - 1].committed) if step else 0)
        assert d["ar_shown"] == min(step, n_ar)
        assert d["diff_stat"].startswith(f"step {step}/{T}")
    assert seen[0]["committed"] < seen[3]["committed"] < seen[T]["committed"] == G  # the shown step changed
    # a user moving the slider (an input event) from step 3 to step 7
    d = dom(chromium, path, "step=3&slide=7")
    assert d["step_num"] == 7 and d["committed"] == committed_by(traj, 7) and d["ar_shown"] == min(7, n_ar)
    # play runs to the end of the race
    d = dom(chromium, path, "step=0&play=1")
    assert d["step_num"] == max(T, n_ar) and d["committed"] == G and d["ar_shown"] == n_ar


def test_browser_screenshot(chromium, page, tmp_path):
    path, _ = page
    shot = tmp_path / "step3.png"
    _browser(chromium, f"{path.as_uri()}#step=3", "--window-size=1280,900", f"--screenshot={shot}")
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    try:
        from PIL import Image
    except ImportError:
        return
    img = Image.open(shot).convert("L")
    assert img.size == (1280, 900)
    lo, hi = img.getextrema()
    assert hi - lo > 100  # text on a background, not a blank page
    keep = os.environ.get("HYBRID_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
