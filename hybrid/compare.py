"""`hybrid compare`: the three modes on one task set, the same loaded components, one table.

For every task of a JSONL task set (default `hybrid/data/tasks.jsonl`: arithmetic word problems generated with
known answers, factual questions with a short canonical answer, open "how do I" questions) it runs the
prebuilt graph in `hybrid` (plan -> score -> revise -> stream), `diffusion` (the planner writes the answer)
and `ar` (the realizer alone) mode, on ONE context (`build_context(..., modes={...})`: every model loaded once),
and reports per mode and planner step count:

    accuracy        checkable tasks only: `number` = last number of the answer (planners.tse.extract_last_number)
                    equals the gold number; `contains` = one of the gold strings appears as a word
    vote acc        temporal self-consistency vote (TSE paper) right, on `number` tasks (planner modes)
    NFE             planner forward passes (plan + revisions); total adds the realizer's (~ one per answer token)
    plan / TTFT / total ms   from the graph's timings (TTFT: request start to first streamed content)
    tok/s           answer tokens / total seconds (end to end, the same definition for every mode)
    answer tokens, TSE (bits), revisions, local / global AR-ness@1 (planners.arness, on the first full draft)

`--steps 8,16,32` sweeps the planner's step budget (the speed/quality dial); AR runs once per task (it has no
steps). Outputs in `--out DIR`: `table.txt`, `runs.csv` (one row per run), `summary.csv`, `summary.json`
(settings + summary + rows), `runs/*.json` (each run's final state with its trajectory, for `hybrid view`),
`latency_vs_steps.png` and `quality_vs_steps.png` (matplotlib, if installed), and with `--html` the viewer
page of the first task.

On `number` tasks the TSE extractor is `last_number` with exact clustering (the paper's setting: a parsed
answer per step); other tasks use the configured extractor (`full_text` + embeddings by default).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import json
import math
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hybrid.config import MODES, ConfigError, HybridConfig

TASKS_PATH = Path(__file__).resolve().parent / "data" / "tasks.jsonl"
PLANNER_MODES = ("hybrid", "diffusion")
Checker = Literal["number", "contains", "none"]
CHECKERS: tuple[str, ...] = ("number", "contains", "none")


# ----------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    id: str
    question: str
    checker: Checker = "none"
    answer: str | list[str] | None = None  # a number (as text) for `number`, accepted strings for `contains`
    kind: str = "open"
    expr: str | None = None  # arithmetic tasks: the expression whose value is the answer

    @property
    def checkable(self) -> bool:
        return self.checker != "none" and self.answer not in (None, "", [])


def parse_task(d: dict[str, Any], where: str = "task") -> Task:
    for key in ("id", "question"):
        if not isinstance(d.get(key), str) or not d[key].strip():
            raise ValueError(f"{where}: `{key}` must be a non-empty string")
    checker = d.get("checker", "none")
    if checker not in CHECKERS:
        raise ValueError(f"{where}: checker={checker!r} is not valid; choose one of: {', '.join(CHECKERS)}")
    answer = d.get("answer")
    if checker != "none" and answer in (None, "", []):
        raise ValueError(f"{where}: checker {checker!r} needs an `answer`")
    if checker == "number":
        from planners.tse import canonical_number

        if canonical_number(str(answer)) is None:
            raise ValueError(f"{where}: answer {answer!r} is not a number")
    return Task(d["id"], d["question"], checker, answer, d.get("kind", "open"), d.get("expr"))


def load_tasks(path: str | Path | None = None, limit: int | None = None) -> list[Task]:
    """Tasks from a JSONL file (one object per line: id, question, checker, answer, kind), first `limit`."""
    p = Path(path) if path else TASKS_PATH
    if not p.exists():
        raise FileNotFoundError(f"task file not found: {p}")
    tasks, seen = [], set()
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not JSON ({e})") from None
        t = parse_task(d, f"{p}:{n}")
        if t.id in seen:
            raise ValueError(f"{p}:{n}: duplicate task id {t.id!r}")
        seen.add(t.id)
        tasks.append(t)
    return tasks[:limit] if limit is not None else tasks


def check_answer(task: Task, text: str | None) -> bool | None:
    """True / False for a checkable task, None otherwise."""
    if not task.checkable:
        return None
    text = text or ""
    if task.checker == "number":
        from planners.tse import canonical_number, extract_last_number

        return extract_last_number(text) == canonical_number(str(task.answer))
    golds = task.answer if isinstance(task.answer, list) else [task.answer]
    hay = " ".join(text.casefold().split())
    return any(re.search(rf"(?<!\w){re.escape(' '.join(str(g).casefold().split()))}(?!\w)", hay) for g in golds)


# Arithmetic word problems with known answers: `generate_arithmetic(12, seed=1)` made the ones in tasks.jsonl
# (seed 1: no answer appears as a number in its own question, so echoing the question scores nothing).
_TEMPLATES: list[tuple[str, str, Callable[[random.Random], dict[str, int]]]] = [
    (
        "Tom has {a} apples. He buys {b} more and then gives {c} to a friend. How many apples does Tom have now?",
        "{a} + {b} - {c}",
        lambda r: {"a": r.randint(5, 30), "b": r.randint(2, 20), "c": r.randint(1, 5)},
    ),
    (
        "A box holds {a} pencils. How many pencils are there in {b} boxes?",
        "{a} * {b}",
        lambda r: {"a": r.randint(3, 12), "b": r.randint(2, 9)},
    ),
    (
        "A bus has {a} passengers. At a stop {b} people get off and {c} get on. How many passengers are on the bus?",
        "{a} - {b} + {c}",
        lambda r: {"a": r.randint(20, 50), "b": r.randint(3, 15), "c": r.randint(2, 12)},
    ),
    (
        "{a} cookies are shared equally among {b} children. How many cookies does each child get?",
        "{a} // {b}",
        lambda r: (lambda b, k: {"a": b * k, "b": b})(r.randint(2, 8), r.randint(2, 9)),
    ),
    (
        "A shirt costs {a} dollars and a hat costs {b} dollars. How much do two shirts and one hat cost?",
        "2 * {a} + {b}",
        lambda r: {"a": r.randint(8, 30), "b": r.randint(5, 20)},
    ),
    (
        "What is {a} plus {b}?",
        "{a} + {b}",
        lambda r: {"a": r.randint(10, 99), "b": r.randint(10, 99)},
    ),
]


def _eval_expr(expr: str) -> int:
    if not re.fullmatch(r"[\d\s+\-*/()]+", expr):
        raise ValueError(f"not an arithmetic expression: {expr!r}")
    return int(eval(expr, {"__builtins__": {}}, {}))  # noqa: S307 - digits and operators only (checked above)


def generate_arithmetic(n: int, seed: int = 1) -> list[dict[str, Any]]:
    """`n` arithmetic word problems (cycling through the templates) with their expression and answer."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        question, expr, draw = _TEMPLATES[i % len(_TEMPLATES)]
        v = draw(r)
        e = expr.format(**v)
        out.append(
            {
                "id": f"arith-{i + 1:02d}",
                "kind": "arithmetic",
                "checker": "number",
                "question": question.format(**v),
                "expr": e,
                "answer": str(_eval_expr(e)),
            }
        )
    return out


# ----------------------------------------------------------------------------------------------- running
def _variant(cfg: HybridConfig, task: Task, steps: int | None) -> HybridConfig:
    """The config a run sees: the sweep's step count, and the paper's number extractor on `number` tasks."""
    update: dict[str, Any] = {}
    if steps is not None:
        update["planner"] = cfg.planner.model_copy(update={"steps": steps})
    if task.checker == "number":
        update["score"] = cfg.score.model_copy(update={"extractor": "last_number", "clusterer": "exact"})
    return cfg.model_copy(update=update) if update else cfg


async def run_graph(graph: Any, ctx: Any, question: str, mode: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One graph run: (final state as a dict, the first full draft's trajectory or None)."""
    final: dict[str, Any] = {}
    first: dict[str, Any] | None = None
    inputs = {"question": question, "mode": mode}
    async for kind, chunk in graph.astream(inputs, context=ctx, stream_mode=["updates", "values"]):
        if kind == "values":
            final = chunk if isinstance(chunk, dict) else chunk.model_dump()
        elif first is None and isinstance(chunk, dict) and isinstance(chunk.get("plan"), dict):
            first = chunk["plan"].get("trajectory")
    return final, first


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def make_row(
    task: Task,
    mode: str,
    steps: int | None,
    final: dict[str, Any],
    first_traj: dict[str, Any] | None,
    wall_s: float,
    error: str | None = None,
) -> dict[str, Any]:
    """One CSV/JSON row for one run."""
    from planners.arness import arness
    from planners.tse import canonical_number

    t = final.get("timings") or {}
    usage = final.get("usage") or {}
    score = final.get("score") or {}
    answer = final.get("answer") or ""
    n_tok = int(usage.get("completion_tokens") or 0)
    nfe_plan = _num(t.get("nfe")) if mode != "ar" else 0.0
    total_ms = _num(t.get("total_ms"))
    vote = score.get("vote") if mode != "ar" else None
    vote_correct = None
    if task.checker == "number" and mode != "ar" and not error:
        vote_correct = vote is not None and canonical_number(str(vote)) == canonical_number(str(task.answer))
    traj = first_traj or final.get("trajectory") if mode != "ar" and not error else None
    a = arness(traj)
    return {
        "task": task.id,
        "kind": task.kind,
        "checker": task.checker,
        "mode": mode,
        "steps": steps,
        "gen_length": traj["gen_length"] if traj else None,
        "steps_run": len(traj["steps"]) if traj else None,  # denoising steps of the first draft
        "correct": None if error else check_answer(task, answer),
        "vote": vote,
        "vote_correct": vote_correct,
        "answer_tokens": n_tok,
        "nfe_plan": nfe_plan,
        "nfe_total": None if nfe_plan is None else nfe_plan + (n_tok if mode != "diffusion" else 0),
        "plan_ms": _num(t.get("plan_ms")) if mode != "ar" else None,
        "ttft_ms": _num(t.get("ttft_ms")),
        "total_ms": total_ms,
        "tok_s": n_tok / (total_ms / 1000) if total_ms and n_tok else None,
        "decode_tok_s": _num(t.get("tokens_per_s")),
        "tse": _num(final.get("tse")) if mode != "ar" else None,
        "value": _num(score.get("value")) if mode != "ar" else None,  # the default signal (score["value"])
        "planned": bool(final.get("plan")) if mode == "hybrid" else None,  # False: untrusted, answered unplanned
        "flip_rate": _num(score.get("flip_rate")),
        "revisions": final.get("revisions") if mode != "ar" else None,
        "accepted": final.get("accepted") if mode != "ar" else None,
        "local_arness": a["local"],
        "global_arness": a["global"],
        "wall_s": round(wall_s, 3),
        "error": error,
        "answer": answer,
        "plan": final.get("plan") if mode == "hybrid" else None,
    }


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)


def _run_file(task: Task, mode: str, steps: int | None) -> str:
    safe = _safe(task.id)
    return f"{safe}__{mode}.json" if steps is None else f"{safe}__{mode}__s{steps}.json"


def _saved_state(final: dict[str, Any], first: dict[str, Any] | None, task: Task, steps: int | None, ctx: Any):
    d = dict(final)
    d.pop("best", None)  # a copy of one draft; the trajectory and score are kept at the top level
    d["first_trajectory"] = first
    d["task"] = dataclasses.asdict(task)
    d["steps"] = steps
    tok = getattr(getattr(ctx.planner, "tokenizer", None), "name_or_path", None)
    if tok:
        d["tokenizer"] = str(tok)
    return d


async def sweep(
    ctx: Any,
    tasks: Sequence[Task],
    *,
    modes: Sequence[str] = MODES,
    steps_list: Sequence[int] | None = None,
    out_dir: Path | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Run every (task, mode, steps); returns (rows, {run file name: saved state}). AR runs once per task."""
    from tqdm import tqdm

    from hybrid.graph import build_graph

    graph = build_graph()
    cfg: HybridConfig = ctx.config
    planner_modes = [m for m in modes if m in PLANNER_MODES]
    steps_list = list(steps_list or [cfg.planner.steps])
    if planner_modes:
        check_steps(ctx, steps_list, planner_modes)
    plan: list[tuple[Task, str, int | None]] = []
    for task in tasks:
        if "ar" in modes:
            plan.append((task, "ar", None))
    for s in steps_list:
        for task in tasks:
            plan.extend((task, m, s) for m in planner_modes)
    rows: list[dict[str, Any]] = []
    states: dict[str, dict[str, Any]] = {}
    runs_dir = out_dir / "runs" if out_dir else None
    if runs_dir:
        runs_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(plan), desc="compare", unit="run", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        for task, mode, s in plan:
            bar.set_postfix_str(f"{task.id} {mode}" + (f" s={s}" if s else ""), refresh=False)
            run_ctx = dataclasses.replace(ctx, config=_variant(cfg, task, s))
            t0 = time.perf_counter()
            final, first, error = {}, None, None
            try:
                final, first = await run_graph(graph, run_ctx, task.question, mode)
            except Exception as e:  # noqa: BLE001 - one failed run is a row with its error, not a lost sweep
                error = f"{type(e).__name__}: {e}"
            row = make_row(task, mode, s, final, first, time.perf_counter() - t0, error)
            name = _run_file(task, mode, s)
            row["run_file"] = f"runs/{name}"
            rows.append(row)
            states[name] = _saved_state(final, first, task, s, ctx)
            if runs_dir:
                (runs_dir / name).write_text(json.dumps(states[name], indent=1, default=str), encoding="utf-8")
            bar.update(1)
    finally:
        bar.close()
    return rows, states


def check_steps(ctx: Any, steps_list: Sequence[int], modes: Sequence[str] = PLANNER_MODES) -> None:
    """Refuse step counts the sampler would reject, before any run (one line naming the bad ones). Diffusion
    mode writes `planner.answer_length` tokens with the steps scaled to match (hybrid.nodes), so both shapes
    are checked."""
    from hybrid.runtime import sampler_config

    bad = []
    for s in steps_list:
        cfg = ctx.config.model_copy(update={"planner": ctx.config.planner.model_copy(update={"steps": s})})
        for mode in [m for m in modes if m in PLANNER_MODES] or ["hybrid"]:
            try:
                sampler_config(cfg, mode)  # the settings each run would plan with (hybrid.nodes)
            except ValueError as e:
                bad.append(f"{s} ({e})")
                break
    if bad:
        raise ValueError("invalid --steps: " + "; ".join(bad))


# ----------------------------------------------------------------------------------------------- summary
SUMMARY_FIELDS = [
    "mode",
    "steps",
    "runs",
    "errors",
    "checked",
    "accuracy",
    "vote_accuracy",
    "voted",
    "nfe_plan",
    "nfe_total",
    "plan_ms",
    "ttft_ms",
    "total_ms",
    "tok_s",
    "answer_tokens",
    "tse",
    "revisions",
    "local_arness",
    "global_arness",
]


def _mean(values: Sequence[Any]) -> float | None:
    xs = [float(v) for v in values if _num(v) is not None]
    return statistics.fmean(xs) if xs else None


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (mode, steps): counts, accuracy over checkable runs, means of the numeric columns."""
    groups: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["steps"]), []).append(r)
    order = {m: i for i, m in enumerate(MODES)}
    out = []
    for (mode, steps), rs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1] or 0)):
        ok = [r for r in rs if not r["error"]]
        checked = [r["correct"] for r in ok if r["correct"] is not None]
        votes = [r["vote_correct"] for r in ok if r["vote_correct"] is not None]
        s = {
            "mode": mode,
            "steps": steps,
            "runs": len(rs),
            "errors": len(rs) - len(ok),
            "checked": len(checked),
            "accuracy": sum(checked) / len(checked) if checked else None,
            "vote_accuracy": sum(votes) / len(votes) if votes else None,
            "voted": len(votes),
        }
        for f in SUMMARY_FIELDS[SUMMARY_FIELDS.index("nfe_plan") :]:
            s[f] = _mean([r[f] for r in ok])
        out.append(s)
    return out


_COLUMNS = [  # (header, field, format)
    ("mode", "mode", "{}"),
    ("steps", "steps", "{}"),
    ("acc", "accuracy", "{:.0%}"),
    ("vote acc", "vote_accuracy", "{:.0%}"),
    ("NFE plan", "nfe_plan", "{:.1f}"),
    ("NFE total", "nfe_total", "{:.1f}"),
    ("plan ms", "plan_ms", "{:.0f}"),
    ("TTFT ms", "ttft_ms", "{:.0f}"),
    ("total ms", "total_ms", "{:.0f}"),
    ("tok/s", "tok_s", "{:.1f}"),
    ("ans tok", "answer_tokens", "{:.1f}"),
    ("TSE", "tse", "{:.2f}"),
    ("rev", "revisions", "{:.2f}"),
    ("AR-loc", "local_arness", "{:.2f}"),
    ("AR-glob", "global_arness", "{:.2f}"),
]


def format_table(summary: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """The summary as a fixed-width text table (or a Markdown table); '–' where a value does not apply."""
    header = [h for h, _, _ in _COLUMNS]
    body = []
    for s in summary:
        cells = []
        for _, f, fmt in _COLUMNS:
            v = s.get(f)
            cells.append("–" if v is None else fmt.format(v))
        if s.get("checked") and s.get("accuracy") is not None:
            cells[2] += f" ({round(s['accuracy'] * s['checked'])}/{s['checked']})"
        if s.get("voted") and s.get("vote_accuracy") is not None:
            cells[3] += f" ({round(s['vote_accuracy'] * s['voted'])}/{s['voted']})"
        if s.get("errors"):
            cells[0] += f" ({s['errors']} err)"
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt_row = lambda r: "  ".join(
        c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
    )
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt_row(header), rule, *(fmt_row(r) for r in body)])


def write_csv(rows: Sequence[dict[str, Any]], path: Path, fields: Sequence[str] | None = None) -> Path:
    fields = list(fields or (rows[0].keys() if rows else []))
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return path


def plot(summary: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """latency_vs_steps.png and quality_vs_steps.png: planner modes as lines over steps, AR as a flat line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "hybrid compare: matplotlib is not installed; no plots (pip install 'hybrid-dllm[plots]')", file=sys.stderr
        )
        return []
    colours = {"hybrid": "tab:green", "diffusion": "tab:purple", "ar": "tab:blue"}
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for s in summary:
        by_mode.setdefault(s["mode"], []).append(s)
    ar = (by_mode.get("ar") or [None])[0]

    def lines(ax, field: str, label: str, style: str = "-", with_ar: bool = True) -> None:
        for mode in PLANNER_MODES:
            pts = [(s["steps"], s[field]) for s in by_mode.get(mode, []) if s[field] is not None]
            if pts:
                xs, ys = zip(*sorted(pts), strict=True)
                ax.plot(xs, ys, style, marker="o", color=colours[mode], label=f"{mode} {label}")
        if with_ar and ar is not None and ar.get(field) is not None:
            ax.axhline(ar[field], linestyle=style, color=colours["ar"], alpha=0.8, label=f"ar {label}")

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lines(axes[0], "total_ms", "total")
    lines(axes[0], "ttft_ms", "TTFT", "--")
    axes[0].set(title="latency vs planner steps", xlabel="planner steps (budget)", ylabel="ms (mean per task)")
    lines(axes[1], "nfe_plan", "planner", with_ar=False)
    lines(axes[1], "nfe_total", "planner + realizer", "--")
    axes[1].set(title="forward passes vs steps", xlabel="planner steps (budget)", ylabel="NFE (mean per task)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "latency_vs_steps.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lines(axes[0], "accuracy", "accuracy")
    lines(axes[0], "vote_accuracy", "vote accuracy", ":")
    axes[0].set(title="quality vs planner steps", xlabel="planner steps (budget)", ylabel="accuracy (checkable tasks)")
    axes[0].set_ylim(-0.05, 1.05)
    lines(axes[1], "tse", "TSE")
    axes[1].set(title="plan stability vs steps", xlabel="planner steps (budget)", ylabel="TSE, bits (lower = stabler)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "quality_vs_steps.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_outputs(
    out_dir: Path,
    rows: Sequence[dict[str, Any]],
    summary: Sequence[dict[str, Any]],
    settings: dict[str, Any],
    *,
    plots: bool = True,
) -> dict[str, Path]:
    """table.txt, runs.csv, summary.csv, summary.json and the plots, in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "table": out_dir / "table.txt",
        "runs_csv": write_csv(rows, out_dir / "runs.csv"),
        "summary_csv": write_csv(summary, out_dir / "summary.csv", SUMMARY_FIELDS),
        "summary_json": out_dir / "summary.json",
    }
    files["table"].write_text(format_table(summary) + "\n", encoding="utf-8")
    files["summary_json"].write_text(
        json.dumps({"settings": settings, "summary": list(summary), "runs": list(rows)}, indent=1, default=str),
        encoding="utf-8",
    )
    if plots:
        for p in plot(summary, out_dir):
            files[p.stem] = p
    return files


def write_first_viewers(
    out_dir: Path, tasks: Sequence[Task], states: dict[str, dict[str, Any]], ctx: Any, steps: int | None
) -> list[Path]:
    """Viewer pages of the first task, one per planner mode (the AR lane races the `ar` mode's answer)."""
    from hybrid.viewer import write_viewer

    if not tasks:
        return []
    task = tasks[0]
    ar_state = states.get(_run_file(task, "ar", None))
    ar_answer = ar_state.get("answer") if ar_state else None
    out = []
    for mode in PLANNER_MODES:
        st = states.get(_run_file(task, mode, steps))
        if st and (st.get("trajectory") or st.get("first_trajectory")):
            path = out_dir / f"viewer_{_safe(task.id)}_{mode}.html"
            out.append(write_viewer(st, ctx.planner, path, ar_answer=ar_answer or None))
    return out


# ----------------------------------------------------------------------------------------------- CLI
def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def _modes(text: str) -> list[str]:
    out = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in out if m not in MODES]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {bad or text!r}; choose from {', '.join(MODES)}")
    return list(dict.fromkeys(out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybrid compare", description="Compare the hybrid, diffusion and AR modes.")
    p.add_argument("--tasks", help=f"JSONL task file (default {TASKS_PATH.name} shipped with the package)")
    p.add_argument("--limit", type=int, help="first N tasks only")
    p.add_argument("--modes", type=_modes, default=list(MODES), help="comma-separated (default hybrid,diffusion,ar)")
    p.add_argument("--steps", type=_int_list, help="planner step budgets to sweep, e.g. 8,16,32 (default: config's)")
    p.add_argument("--config", help="YAML or JSON config file")
    p.add_argument("--max-tokens", type=int, help="realizer max tokens (default: config's)")
    p.add_argument("--gen-length", type=int, help="planner generation length (default: config's)")
    p.add_argument("--out", default="hybrid-compare", help="output directory (default ./hybrid-compare)")
    p.add_argument("--html", action="store_true", help="also write the trajectory viewer page of the first task")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--threads", type=int, help="torch intra-op threads for the planner (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or loading messages")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)

    def fail(msg: str) -> int:
        print(f"hybrid: error: {msg}", file=sys.stderr)
        return 2

    if args.limit is not None and args.limit < 1:
        return fail("--limit must be at least 1")
    try:
        tasks = load_tasks(args.tasks, args.limit)
        cfg = HybridConfig.load(
            args.config, **{"realizer.max_tokens": args.max_tokens, "planner.gen_length": args.gen_length}
        )
    except (ConfigError, FileNotFoundError, ValueError) as e:
        return fail(str(e))
    if not tasks:
        return fail("the task file holds no tasks")
    if args.threads is not None:
        if args.threads < 1:
            return fail("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    from hybrid.runtime import SetupError, build_context

    t_start = time.time()
    say = (
        (lambda _m: None) if args.quiet else (lambda m: print(f"[{time.time() - t_start:5.1f}s] {m}", file=sys.stderr))
    )
    try:
        ctx = build_context(cfg, say, modes=set(args.modes))
    except SetupError as e:
        return fail(str(e))
    out_dir = Path(args.out)
    try:
        if ctx.planner is not None:
            check_steps(ctx, args.steps or [cfg.planner.steps], args.modes)
    except ValueError as e:
        return fail(str(e))
    say(f"running {len(tasks)} tasks x modes {','.join(args.modes)} x steps {args.steps or [cfg.planner.steps]} ...")
    rows, states = asyncio.run(
        sweep(ctx, tasks, modes=args.modes, steps_list=args.steps, out_dir=out_dir, progress=not args.quiet)
    )
    summary = summarise(rows)
    settings = {
        "command": "hybrid compare " + " ".join(argv if argv is not None else sys.argv[1:]),
        "tasks": [t.id for t in tasks],
        "modes": args.modes,
        "steps": args.steps or [cfg.planner.steps],
        "planner": getattr(ctx.planner, "name", None),
        "realizer": getattr(ctx.realizer, "name", None),
        "config": cfg.model_dump(mode="json"),
        "wall_s": round(time.time() - t_start, 1),
    }
    files = write_outputs(out_dir, rows, summary, settings, plots=not args.no_plots)
    if args.html:
        first_steps = (args.steps or [cfg.planner.steps])[0]
        for p in write_first_viewers(out_dir, tasks, states, ctx, first_steps):
            files[p.stem] = p
    print(format_table(summary))
    print(f"\nwrote {len(files)} files and {len(states)} run states to {out_dir}/", file=sys.stderr)
    errors = [r for r in rows if r["error"]]
    for r in errors[:5]:
        print(f"error: {r['task']} {r['mode']}: {r['error']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
