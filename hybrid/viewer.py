"""Trajectory viewer: one self-contained HTML page (inline CSS and JS, no network) that replays a denoise.

`write_viewer(state_or_trajectory, tokens, path)` turns a run's final state (what `hybrid run --json` prints,
what `hybrid compare` saves) or a bare `Trajectory.to_dict()` into a page that shows, step by step, the
generation span: masked positions (with the model's current guess, x0-hat, faint), tokens committed at this
step, tokens whose guess changed since the last step, and committed tokens shaded by their confidence. A
slider (and a play button) moves through the steps; `#step=N` in the URL opens a given step. Beside it runs
a race: an AR lane that emits one token per forward pass, left to right (the realized answer's
tokens, or the diffusion's own final tokens when there is no AR answer), against the diffusion lane, on one
clock of forward passes, with step counters and NFE.

The page needs token *strings*; trajectories hold ids. `tokens` decodes them: a tokenizer, a `Planner` (its
tokenizer), a callable ids -> text, a mapping id -> piece (pretokenised), or None (SmolLM2's tokenizer, the
embedded planner's, loaded from the packaged model). `hybrid view RUN.json` loads only that tokenizer (the
path in the JSON's `tokenizer` field, else SmolLM2's).

What it does not know: models, graphs, how the trajectory was sampled. Module import is light (no torch).
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

PieceFn = Callable[[int], str]


# ----------------------------------------------------------------------------------------------- decoding
def load_tokenizer(path: str | Path | None = None) -> Any:
    """A Hugging Face tokenizer from `path`, else SmolLM2's (the embedded planner's and realizer's vocabulary)."""
    from transformers import AutoTokenizer

    if path is None:
        from planners.assets import smollm2_hf_dir

        path = smollm2_hf_dir()
    return AutoTokenizer.from_pretrained(str(path))


def _tokenizer_of(tokens: Any) -> Any | None:
    if tokens is None:
        return load_tokenizer()
    if hasattr(tokens, "tokenizer") and hasattr(tokens.tokenizer, "decode"):  # a Planner
        return tokens.tokenizer
    if hasattr(tokens, "decode") and hasattr(tokens, "convert_ids_to_tokens"):
        return tokens
    return None


def piece_fn(tokens: Any) -> tuple[PieceFn, Callable[[str], list[str]] | None, set[int]]:
    """(id -> piece, text -> pieces or None, special ids) from whatever the caller holds (module docstring)."""
    tok = _tokenizer_of(tokens)
    if tok is not None:

        def piece(i: int) -> str:
            return tok.decode([int(i)], skip_special_tokens=False, clean_up_tokenization_spaces=False)

        def split(text: str) -> list[str]:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            return [piece(i) for i in ids]

        return piece, split, set(getattr(tok, "all_special_ids", []) or [])
    if isinstance(tokens, Mapping):
        table = {int(k): str(v) for k, v in tokens.items()}
        return (lambda i: table.get(int(i), f"<{int(i)}>")), None, set()
    if callable(tokens):
        return (lambda i: str(tokens([int(i)]))), None, set()
    raise TypeError(f"cannot decode tokens with {type(tokens).__name__}: pass a tokenizer, Planner, callable or dict")


def word_pieces(text: str) -> list[str]:
    """Fallback AR pieces when no tokenizer is at hand: words with their leading whitespace."""
    return re.findall(r"\s*\S+", text)


# ----------------------------------------------------------------------------------------------- replay
def _traj_dict(obj: Any) -> dict[str, Any]:
    return obj.to_dict() if hasattr(obj, "to_dict") and hasattr(obj, "steps") else dict(obj)


def split_input(state_or_traj: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state, trajectory dict or None). A bare trajectory (has `steps` and `gen_length`) gets an empty state."""
    if hasattr(state_or_traj, "model_dump"):
        state_or_traj = state_or_traj.model_dump()
    if hasattr(state_or_traj, "to_dict") and hasattr(state_or_traj, "steps"):
        return {}, state_or_traj.to_dict()
    d = dict(state_or_traj)
    if "steps" in d and "gen_length" in d:
        return {}, d
    traj = d.get("first_trajectory") or d.get("trajectory")  # compare keeps the first full draft
    return d, (_traj_dict(traj) if traj else None)


def replay(traj: dict[str, Any]) -> dict[str, Any]:
    """Per step s = 0..T the span as shown after step s (s = 0: before any step): token id or -1 (masked),
    the x0-hat guess at masked positions (-1: none), the confidence of each committed token, and which
    positions were committed / remasked at s. Positions never committed but masked at the start (the tail
    an EOS early stop filled) show as masked until the end, then as `filled`."""
    from planners.arness import initially_masked

    G, T, mask = int(traj["gen_length"]), len(traj["steps"]), int(traj["mask_id"])
    steps, final = traj["steps"], [int(t) for t in traj["final"]]
    committed_ever = {p for s in steps for p in s["committed"]}
    if T:
        s0 = steps[0]
        n_masked0 = int(s0.get("masked_after", 0)) + len(s0["committed"]) - len(s0.get("remasked", []))
    else:
        n_masked0 = 0
    masked0 = set(range(G)) if n_masked0 >= G else set(initially_masked(traj))
    fill = sorted(masked0 - committed_ever)  # masked at the start, never committed: filled after a block
    last_commit: dict[int, int] = {}
    for s, st in enumerate(steps):
        for p in st["committed"]:
            last_commit[p] = s

    def commit_token(s: int, p: int) -> int:
        if last_commit.get(p) == s:
            return final[p]
        if s + 1 < T and p not in steps[s].get("remasked", []):
            return int(steps[s + 1]["x0_hat"][p])  # the next step sees the committed token itself
        return int(steps[s]["x0_hat"][p])

    shown = [[-1 if p in masked0 else final[p] for p in range(G)]]
    conf: list[list[float | None]] = [[None] * G]
    guess = [[-1] * G]
    for s, st in enumerate(steps):
        row, crow = list(shown[-1]), list(conf[-1])
        for p, c in zip(st["committed"], st["confidences"], strict=False):
            row[p], crow[p] = commit_token(s, p), round(float(c), 4)
        for p in st.get("remasked", []):
            row[p], crow[p] = -1, None
        if s == T - 1:
            for p in fill:
                row[p] = final[p]
        x0 = [int(t) for t in st["x0_hat"]]
        guess.append([x0[p] if row[p] == -1 and x0[p] != mask else -1 for p in range(G)])
        shown.append(row)
        conf.append(crow)
    nfe = int(traj.get("nfe") or T)
    per_step = nfe / T if T else 0.0
    cum_s, acc = [0.0], 0.0
    for st in steps:
        acc += float(st.get("seconds") or 0.0)
        cum_s.append(round(acc, 4))
    return {
        "G": G,
        "T": T,
        "nfe": nfe,
        "nfe_per_step": per_step,
        "shown": shown,
        "guess": guess,
        "conf": conf,
        "committed": [[]] + [sorted(st["committed"]) for st in steps],
        "remasked": [[]] + [sorted(st.get("remasked", [])) for st in steps],
        "block": [None] + [st.get("block") for st in steps],
        "filled": fill,
        "seconds": cum_s,
        "prompt_length": traj.get("prompt_length"),
    }


def page_data(
    state_or_traj: Any,
    tokens: Any = None,
    *,
    ar_answer: str | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data with token pieces already decoded."""
    state, traj = split_input(state_or_traj)
    piece, split, special = piece_fn(tokens)
    rp = replay(traj) if traj else None
    ids: set[int] = set()
    if rp:
        for rows in (rp["shown"], rp["guess"]):
            for row in rows:
                ids.update(t for t in row if t >= 0)
    mode = state.get("mode")
    answer = ar_answer if ar_answer is not None else (state.get("answer") if mode != "diffusion" else None)
    if answer:
        ar_pieces = split(answer) if split else word_pieces(answer)
        ar_source = "AR answer" + ("" if split else " (words: no tokenizer)")
    elif rp:  # the same tokens, left to right, one per pass: the race on equal output
        final_ids = [t for t in rp["shown"][-1] if t >= 0]
        stop = [i for i, t in enumerate(final_ids) if t in special]
        ar_pieces = [piece(t) for t in final_ids[: stop[0] if stop else len(final_ids)]]
        ar_source = "the diffusion's final tokens, emitted left to right"
    else:
        ar_pieces, ar_source = [], "none"
    arness = None
    if traj:
        from planners.arness import arness as _arness

        arness = _arness(traj)
    timings = {k: v for k, v in (state.get("timings") or {}).items() if isinstance(v, int | float)}
    return {
        "title": title or state.get("question") or "denoising trajectory",
        "mode": mode,
        "question": state.get("question"),
        "plan": state.get("plan"),
        "answer": state.get("answer"),
        "tse": state.get("tse"),
        "revisions": state.get("revisions"),
        "accepted": state.get("accepted"),
        "timings": timings,
        "arness": arness,
        "pieces": {str(i): piece(i) for i in sorted(ids)},
        "special": sorted(i for i in ids if i in special),
        "traj": rp,
        "ar": {"pieces": ar_pieces, "source": ar_source},
        "showing": "first full draft" if state.get("first_trajectory") else "final draft",
    }


# ----------------------------------------------------------------------------------------------- page
_CSS = """
:root { --mask:#e6e8ec; --ink:#1d2330; --new:#ffb300; --chg:#e4572e; --ok:46,125,50; --ar:33,102,172; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "DejaVu Sans", sans-serif; color: var(--ink); margin: 18px;
       background: #fafbfc; }
h1 { font-size: 18px; margin: 0 0 4px; }
.sub { color: #5b6476; margin-bottom: 12px; }
.controls { display: flex; gap: 10px; align-items: center; flex-wrap: wrap; background: #fff; padding: 10px 12px;
            border: 1px solid #dde1e7; border-radius: 8px; position: sticky; top: 0; z-index: 2; }
.controls input[type=range] { flex: 1 1 360px; }
button { font: inherit; padding: 4px 12px; border-radius: 6px; border: 1px solid #b9c0cc; background: #fff;
         cursor: pointer; }
.counter { font-variant-numeric: tabular-nums; }
.race { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; margin-top: 12px; }
.lane { background: #fff; border: 1px solid #dde1e7; border-radius: 8px; padding: 10px 12px; }
.lane h2 { font-size: 15px; margin: 0 0 2px; }
.lane .stat { color: #5b6476; margin-bottom: 8px; font-variant-numeric: tabular-nums; }
.bar { height: 6px; background: #eceef2; border-radius: 3px; margin-bottom: 10px; overflow: hidden; }
.bar > div { height: 100%; width: 0; }
.tokens { display: flex; flex-wrap: wrap; gap: 3px; align-content: flex-start; }
.tok { display: inline-block; min-width: 18px; padding: 1px 4px; border-radius: 4px; white-space: pre;
       font: 13px/1.5 ui-monospace, "DejaVu Sans Mono", monospace; border: 1.5px solid transparent; }
.tok.masked { background: var(--mask); color: #9aa1ad; }
.tok.masked.guess { font-style: italic; }
.tok.committed { color: #0d1b0e; }
.tok.new { border-color: var(--new); box-shadow: 0 0 0 1px var(--new); }
.tok.changed { border-color: var(--chg); border-style: dashed; }
.tok.filled { background: #f1e4ff; color: #5e3b8c; }
.tok.special { font-style: italic; }
.tok.ar.shown { background: rgba(var(--ar),0.14); }
.tok.ar.masked { background: var(--mask); color: transparent; }
.legend { display: flex; gap: 14px; flex-wrap: wrap; margin-top: 10px; color: #5b6476; }
.legend .tok { margin-right: 4px; }
.steps { display: flex; align-items: flex-end; gap: 1px; height: 28px; margin-top: 10px; }
.steps > div { flex: 1 1 0; background: #c7ccd6; min-height: 2px; }
.steps > div.cur { background: var(--new); }
.meta { margin-top: 12px; display: grid; grid-template-columns: 1fr 1fr; gap: 14px; }
.meta pre { white-space: pre-wrap; background: #fff; border: 1px solid #dde1e7; border-radius: 8px; padding: 8px;
            margin: 4px 0 0; max-height: 220px; overflow: auto; }
table.kv td { padding: 1px 10px 1px 0; font-variant-numeric: tabular-nums; }
"""

_JS = r"""
(function () {
  const D = JSON.parse(document.getElementById('viewer-data').textContent);
  const R = D.traj, AR = D.ar.pieces;
  const T = R ? R.T : 0, G = R ? R.G : 0, N = AR.length;
  const maxStep = Math.max(T, N);
  const $ = (id) => document.getElementById(id);
  const piece = (id) => {
    let p = D.pieces[String(id)];
    if (p === undefined) p = '<' + id + '>';
    return show(p);
  };
  function show(p) {
    p = p.replace(/\n/g, '\u21b5');
    return p.length ? p : '\u2205';
  }
  const special = new Set(D.special || []);
  const slider = $('step');
  slider.max = String(maxStep);
  // build the cells once; a step only changes classes and text
  const dcells = [], acells = [];
  for (let p = 0; p < G; p++) {
    const el = document.createElement('span');
    el.className = 'tok'; el.dataset.pos = String(p);
    $('diff-lane').appendChild(el); dcells.push(el);
  }
  for (let i = 0; i < N; i++) {
    const el = document.createElement('span');
    el.className = 'tok ar'; el.dataset.pos = String(i);
    $('ar-lane').appendChild(el); acells.push(el);
  }
  if (R) {  // tokens committed per step, as a strip of bars under the slider
    const most = Math.max(1, ...R.committed.map((c) => c.length));
    for (let s = 1; s <= maxStep; s++) {  // one bar per pass of the race; the diffusion's end at T
      const b = document.createElement('div');
      const n = s <= T ? R.committed[s].length : 0;
      b.style.height = (100 * n / most) + '%';
      b.title = s <= T ? 'step ' + s + ': ' + n + ' committed' : 'pass ' + s + ': AR only';
      $('strip').appendChild(b);
    }
  }
  const showGuess = $('show-guess');

  function render(step) {
    step = Math.max(0, Math.min(maxStep, step | 0));
    slider.value = String(step);
    document.body.dataset.step = String(step);
    $('step-num').textContent = String(step);
    $('step-max').textContent = String(maxStep);
    if (R) {
      const s = Math.min(step, T);
      const shown = R.shown[s], guess = R.guess[s], conf = R.conf[s];
      const prev = R.shown[Math.max(0, s - 1)], prevGuess = R.guess[Math.max(0, s - 1)];
      const isNew = new Set(s > 0 ? R.committed[s] : []);
      let done = 0;
      for (let p = 0; p < G; p++) {
        const el = dcells[p], t = shown[p];
        const cls = ['tok'];
        el.style.background = '';
        if (t >= 0) {
          done++;
          const filled = s === T && R.filled.includes(p);
          cls.push(filled ? 'filled' : 'committed');
          if (isNew.has(p)) cls.push('new');
          else if (s > 0 && prev[p] >= 0 && prev[p] !== t) cls.push('changed');
          if (special.has(t)) cls.push('special');
          el.textContent = piece(t);
          const c = conf[p];
          if (!filled) el.style.background = 'rgba(' + getComputedStyle(document.body).getPropertyValue('--ok') +
              ',' + (c === null || c === undefined ? 0.25 : (0.12 + 0.6 * c)).toFixed(3) + ')';
          el.title = 'pos ' + p + (c === null || c === undefined ? '' : ', confidence ' + c.toFixed(3));
        } else {
          cls.push('masked');
          const g = guess[p];
          if (g >= 0 && showGuess.checked) { cls.push('guess'); el.textContent = piece(g); }
          else el.textContent = '\u2591\u2591';
          if (s > 1 && g >= 0 && prevGuess[p] >= 0 && prevGuess[p] !== g) cls.push('changed');
          el.title = 'pos ' + p + ' masked' + (g >= 0 ? ', guess ' + JSON.stringify(D.pieces[String(g)]) : '');
        }
        el.className = cls.join(' ');
      }
      const nfe = Math.round(s * R.nfe_per_step);
      $('diff-stat').textContent = 'step ' + s + '/' + T + ' \u00b7 NFE ' + nfe + '/' + R.nfe + ' \u00b7 ' +
          done + '/' + G + ' tokens' + (s >= T ? ' \u00b7 done' : '') +
          (R.seconds[s] ? ' \u00b7 ' + (1000 * R.seconds[s]).toFixed(0) + ' ms' : '');
      $('diff-bar').style.width = (100 * done / Math.max(1, G)) + '%';
      $('diff-lane').dataset.step = String(s);
      $('diff-lane').dataset.committed = String(done);
      const cur = $('strip').children;
    }
    const a = Math.min(step, N);
    for (let i = 0; i < N; i++) {
      const el = acells[i];
      el.textContent = show(AR[i]);
      el.className = i < a ? 'tok ar shown' + (i === a - 1 && step <= N ? ' new' : '') : 'tok ar masked';
    }
    $('ar-stat').textContent = 'step ' + a + '/' + N + ' \u00b7 NFE ' + a + '/' + N + ' \u00b7 ' + a + '/' + N +
        ' tokens' + (a >= N && N > 0 ? ' \u00b7 done' : '');
    $('ar-bar').style.width = (100 * a / Math.max(1, N)) + '%';
    $('ar-lane').dataset.step = String(a);
    $('ar-lane').dataset.shown = String(a);
    let verdict = '';
    if (R && N) {
      if (step >= T && step >= N) verdict = T < N ? 'diffusion finished first (' + T + ' vs ' + N + ' passes)' :
          T > N ? 'AR finished first (' + N + ' vs ' + T + ' passes)' : 'tie at ' + T + ' passes';
      else if (step >= T) verdict = 'diffusion done after ' + T + ' passes; AR still writing';
      else if (step >= N) verdict = 'AR done after ' + N + ' passes; diffusion still denoising';
    }
    $('verdict').textContent = verdict;
    const bars = $('strip').children;
    for (let i = 0; i < bars.length; i++) bars[i].className = (i + 1 === step) ? 'cur' : '';
    try { history.replaceState(null, '', '#step=' + step); } catch (e) { /* file:// in some browsers */ }
  }

  let timer = null;
  function stop() { if (timer) { clearInterval(timer); timer = null; } $('play').textContent = '\u25b6 play'; }
  $('play').addEventListener('click', () => {
    if (timer) { stop(); return; }
    if (Number(slider.value) >= maxStep) render(0);
    $('play').textContent = '\u275a\u275a pause';
    timer = setInterval(() => {
      const s = Number(slider.value) + 1;
      if (s > maxStep) { stop(); return; }
      render(s);
    }, Number($('speed').value));
  });
  $('prev').addEventListener('click', () => { stop(); render(Number(slider.value) - 1); });
  $('next').addEventListener('click', () => { stop(); render(Number(slider.value) + 1); });
  slider.addEventListener('input', () => { stop(); render(Number(slider.value)); });
  showGuess.addEventListener('change', () => render(Number(slider.value)));
  // URL hash: #step=N opens step N; #step=N&slide=M then moves the slider to M as a user would (an input
  // event), #step=N&play=1 presses play: what a headless browser check drives.
  const hp = new URLSearchParams(location.hash.slice(1));
  render(hp.has('step') ? Number(hp.get('step')) : maxStep);
  if (hp.has('slide')) { slider.value = hp.get('slide'); slider.dispatchEvent(new Event('input')); }
  if (hp.get('play') === '1') $('play').click();
  window.addEventListener('hashchange', () => {
    const h = new URLSearchParams(location.hash.slice(1));
    if (h.has('step') && Number(h.get('step')) !== Number(slider.value)) render(Number(h.get('step')));
  });
})();
"""


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render_html(data: dict[str, Any]) -> str:
    """The page: static skeleton + data island (`<script type="application/json">`) + the replay script."""
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    blob = blob.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")  # safe inside <script>
    e = html.escape
    t = data.get("timings") or {}
    rows = [
        ("mode", data.get("mode")),
        ("NFE (planner)", (data.get("traj") or {}).get("nfe")),
        ("plan ms", t.get("plan_ms")),
        ("TTFT ms", t.get("ttft_ms")),
        ("total ms", t.get("total_ms")),
        ("TSE (bits)", data.get("tse")),
        ("revisions", data.get("revisions")),
        ("local AR-ness@1", (data.get("arness") or {}).get("local")),
        ("global AR-ness@1", (data.get("arness") or {}).get("global")),
    ]
    kv = "".join(f"<tr><td>{e(k)}</td><td>{e(_fmt(v, 1 if 'ms' in k else 3))}</td></tr>" for k, v in rows)
    traj = data.get("traj") or {}
    sub = (
        f"{e(str(data.get('mode') or 'trajectory'))} · {traj.get('G', 0)} positions · {traj.get('T', 0)} denoising "
        f"steps · showing the {e(data.get('showing', 'final draft'))}"
    )
    plan = data.get("plan") or ""
    answer = data.get("answer") or ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>hybrid viewer · {e(str(data.get("title", ""))[:80])}</title>
<style>{_CSS}</style></head>
<body data-step="0">
<h1>{e(str(data.get("title", "")))}</h1>
<div class="sub">{sub}</div>
<div class="controls">
  <button id="play" type="button">&#9654; play</button>
  <button id="prev" type="button" title="previous step">&#8249;</button>
  <button id="next" type="button" title="next step">&#8250;</button>
  <input id="step" type="range" min="0" max="0" value="0" aria-label="step">
  <span class="counter">step <b id="step-num">0</b> / <span id="step-max">0</span></span>
  <label><input id="show-guess" type="checkbox" checked> show guesses (x0-hat)</label>
  <label>speed <select id="speed"><option value="400">slow</option><option value="150" selected>normal</option>
  <option value="50">fast</option></select></label>
</div>
<div class="steps" id="strip" title="tokens committed per step"></div>
<div class="race">
  <div class="lane"><h2>Diffusion (masked denoising)</h2><div class="stat" id="diff-stat"></div>
    <div class="bar"><div id="diff-bar" style="background:rgb(46,125,50)"></div></div>
    <div class="tokens" id="diff-lane"></div></div>
  <div class="lane"><h2>Autoregressive (one token per pass)</h2><div class="stat" id="ar-stat"></div>
    <div class="bar"><div id="ar-bar" style="background:rgb(33,102,172)"></div></div>
    <div class="tokens" id="ar-lane"></div>
    <div class="sub" style="margin-top:6px">tokens: {e(data["ar"]["source"])}</div></div>
</div>
<div class="sub" id="verdict" style="margin-top:8px"></div>
<div class="legend">
  <span><span class="tok masked">&#9617;&#9617;</span>masked</span>
  <span><span class="tok masked guess">guess</span>masked, current guess</span>
  <span><span class="tok committed new" style="background:rgba(46,125,50,.5)">new</span>committed this step</span>
  <span><span class="tok changed masked">chg</span>changed since last step</span>
  <span><span class="tok committed" style="background:rgba(46,125,50,.2)">low</span>
        <span class="tok committed" style="background:rgba(46,125,50,.7)">high</span>confidence</span>
  <span><span class="tok filled">eos</span>filled after an early stop</span>
</div>
<div class="meta">
  <div><b>Run</b><table class="kv">{kv}</table></div>
  <div><b>Plan</b><pre>{e(plan) or "–"}</pre><b>Answer</b><pre>{e(answer) or "–"}</pre></div>
</div>
<script type="application/json" id="viewer-data">{blob}</script>
<script>{_JS}</script>
</body></html>
"""


def write_viewer(
    state_or_trajectory: Any,
    tokens: Any,
    path: str | Path,
    *,
    ar_answer: str | None = None,
    title: str | None = None,
) -> Path:
    """Write the viewer page for a run's final state (dict or `HybridState`) or a trajectory (dict or
    `Trajectory`). `tokens`: tokenizer, Planner, callable ids -> text, mapping id -> piece, or None
    (SmolLM2's tokenizer). `ar_answer`: the AR lane's text (e.g. the `ar` mode's answer to the same
    question); default: the state's answer, or the diffusion's own tokens. Returns the path written."""
    data = page_data(state_or_trajectory, tokens, ar_answer=ar_answer, title=title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(data), encoding="utf-8")
    return out


# ----------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hybrid view", description="Write the step-by-step trajectory viewer page.")
    p.add_argument("run", help="a run's JSON: `hybrid run --json` output or a file saved by `hybrid compare`")
    p.add_argument("-o", "--output", help="HTML file to write (default: RUN.html beside the JSON)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the JSON's `tokenizer`, else SmolLM2's)")
    p.add_argument("--ar-answer", help="text for the AR lane of the race (default: the run's answer)")
    args = p.parse_args(list(argv) if argv is not None else None)
    src = Path(args.run)
    try:
        state = json.loads(src.read_text(encoding="utf-8"))
    except FileNotFoundError:
        print(f"hybrid: error: no such file: {src}", file=sys.stderr)
        return 2
    except json.JSONDecodeError as e:
        print(f"hybrid: error: {src} is not JSON ({e})", file=sys.stderr)
        return 2
    if not isinstance(state, dict):
        print(f"hybrid: error: {src} holds no run state (expected a JSON object)", file=sys.stderr)
        return 2
    _, traj = split_input(state)
    if traj is None and not state.get("answer"):
        print(f"hybrid: error: {src} has neither a trajectory nor an answer to show", file=sys.stderr)
        return 2
    tok_path = args.tokenizer or state.get("tokenizer")
    try:
        tok = load_tokenizer(tok_path)
    except (OSError, ValueError) as e:
        print(f"hybrid: error: cannot load the tokenizer {tok_path or '(SmolLM2)'}: {e}", file=sys.stderr)
        return 2
    out = Path(args.output) if args.output else src.with_suffix(".html")
    write_viewer(state, tok, out, ar_answer=args.ar_answer)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
