"""A voice-agent client of `hybrid serve`: streams an answer and "speaks" it the way a text-to-speech front end
consumes text, measuring the latencies a voice backend cares about.

    hybrid serve --port 8000 &                       # or: python -m hybrid.server --port 8000
    python examples/voice_agent.py "How do I make a cup of tea?"
    python examples/voice_agent.py "Plan a weekend in Lisbon." --mode ar --budget-ms 200

Uses the plain `openai` client against the OpenAI-compatible endpoint. The server streams the planner's plan
as `delta.reasoning_content` (never spoken) and the answer as `delta.content`; a TTS engine wants whole
phrases, so content is buffered to sentence or clause boundaries and each phrase is "spoken" (printed) with its
time since the request was sent. Reported against the budget (`--budget-ms`, 200 ms: the voice-agent goal of
a GPU deployment; on a CPU-only machine expect seconds, dominated by planning):
  plan     time until the plan chunk arrived (the server's own plan_ms is shown beside it)
  TTFT     time to the first non-empty content token
  speech   time to the first phrase handed to TTS (what the listener waits for)
  total    time to the end of the stream
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time

import openai

# a phrase ends at sentence punctuation, or at a clause mark once it is long enough to sound natural
_SENTENCE = re.compile(r"[.!?…]+[\"')\]]*\s")
_CLAUSE = re.compile(r"[,;:—–]\s")
_WORD = re.compile(r"[^\W\d_]{2,}")  # two letters in a row: the phrase has a word to say


class SpeechChunker:
    """Buffers streamed text into speakable phrases: a sentence end cuts once the phrase has a word (a list's
    "1." stays with its item); a clause mark (, ; : —) cuts once the phrase has `min_clause_chars`; anything
    past `max_chars` is cut at the last space."""

    def __init__(self, min_clause_chars: int = 24, max_chars: int = 160) -> None:
        self.buf = ""
        self.min_clause_chars, self.max_chars = min_clause_chars, max_chars

    def feed(self, text: str) -> list[str]:
        self.buf += text
        out = []
        while True:
            cut = self._cut()
            if cut is None:
                return out
            phrase, self.buf = self.buf[:cut].strip(), self.buf[cut:]
            if phrase:
                out.append(phrase)

    def flush(self) -> list[str]:
        phrase, self.buf = self.buf.strip(), ""
        return [phrase] if phrase else []

    def _cut(self) -> int | None:
        for m in _SENTENCE.finditer(self.buf):
            if _WORD.search(self.buf[: m.start()]):  # "1. " of a list is not a sentence of its own
                return m.end()
        for m in _CLAUSE.finditer(self.buf):
            if m.start() >= self.min_clause_chars:
                return m.end()
        if len(self.buf) > self.max_chars:
            space = self.buf.rfind(" ", 0, self.max_chars)
            return space + 1 if space > 0 else self.max_chars
        return None


async def converse(args: argparse.Namespace) -> int:
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=args.timeout)
    chunker = SpeechChunker()
    t0 = time.perf_counter()
    ms = lambda: (time.perf_counter() - t0) * 1000  # noqa: E731
    marks: dict[str, float] = {}
    plan_info: dict = {}
    done_info: dict = {}

    def speak(phrase: str) -> None:
        marks.setdefault("speech", ms())
        print(f"[{ms():7.0f} ms] speak: {phrase}", flush=True)

    try:
        stream = await client.chat.completions.create(
            model=args.model,
            messages=[{"role": "user", "content": args.question}],
            max_tokens=args.max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"hybrid_mode": args.mode} if args.mode else None,
        )
        async for chunk in stream:
            extra = chunk.model_extra or {}
            info = extra.get("hybrid") or {}
            if info.get("event") == "done":
                done_info = info
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            plan = (delta.model_extra or {}).get("reasoning_content")
            if plan or info.get("event") == "plan":
                marks.setdefault("plan", ms())
                plan_info = info
                if plan and args.show_plan:
                    print(f"[{ms():7.0f} ms] plan (not spoken): {plan!r}", flush=True)
            if delta.content:
                marks.setdefault("ttft", ms())
                for phrase in chunker.feed(delta.content):
                    speak(phrase)
        for phrase in chunker.flush():
            speak(phrase)
    except openai.APIStatusError as e:
        print(f"voice_agent: the server refused the request ({e.status_code}): {e.message}", file=sys.stderr)
        return 1
    except openai.APIConnectionError as e:
        print(f"voice_agent: cannot reach {args.base_url}: {e}", file=sys.stderr)
        return 1
    except openai.APIError as e:  # an error event inside the stream (e.g. the realizer failed mid-answer)
        print(f"\nvoice_agent: the answer was cut off: {e.message}", file=sys.stderr)
        return 1
    finally:
        await client.close()
    marks["total"] = ms()
    report(args, marks, plan_info, done_info)
    return 0


def report(args: argparse.Namespace, marks: dict[str, float], plan_info: dict, done_info: dict) -> None:
    budget = args.budget_ms
    print()
    if "plan" in marks:
        server = f" (server: plan {plan_info.get('plan_ms', 0):.0f} ms, {plan_info.get('nfe')} NFE, "
        value = (plan_info.get("score") or {}).get("value")  # TSE itself comes after the answer (score.defer)
        server += f"score {'-' if value is None else f'{value:.3f}'}, {plan_info.get('revisions', 0)} revision(s))"
        print(f"plan    {marks['plan']:7.0f} ms{server}")
    for name in ("ttft", "speech", "total"):
        if name in marks:
            verdict = ""
            if name in ("ttft", "speech"):
                over = marks[name] - budget
                verdict = f"  {'within' if over <= 0 else 'over'} the {budget:.0f} ms budget"
                verdict += f" by {abs(over):.0f} ms" if over > 0 else ""
            print(f"{name:7s} {marks[name]:7.0f} ms{verdict}")
    t = done_info.get("timings", {})
    if t:
        planned = f"plan {t['plan_ms']:.0f} ms + score {t.get('score_ms', 0):.0f} ms -> " if "plan_ms" in t else ""
        print(
            f"server  {planned}TTFT {t.get('ttft_ms', 0):.0f} ms; {t.get('tokens_per_s', 0):.1f} tok/s; "
            f"total {t.get('total_ms', 0):.0f} ms"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("question")
    p.add_argument("--base-url", default=os.environ.get("HYBRID_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", default=os.environ.get("HYBRID_API_KEY", "EMPTY"))
    p.add_argument("--model", default="hybrid")
    p.add_argument("--mode", choices=["hybrid", "ar", "diffusion"], help="hybrid_mode (default: the server's)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--budget-ms", type=float, default=200.0, help="latency budget for TTFT / first speech")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait on the server")
    p.add_argument("--show-plan", action="store_true", help="print the plan (a voice client never speaks it)")
    return asyncio.run(converse(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
