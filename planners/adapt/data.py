"""Adaptation data: a generated prompt set and self-distilled responses.

- `make_prompts(seed)`: thousands of diverse prompts from templates × topics (how-to questions,
  explanations, plan-shaped requests, comparisons, short factual and arithmetic questions). Deterministic
  by seed; the held-out split is chosen by topic (a held-out topic never appears in training under any
  template), so held-out metrics measure generalisation, not template recall. Arithmetic items carry
  their exact answer (`answer`) so benchmarks can check correctness.
- `distill(...)`: the packaged instruct model answers every prompt itself through llama-cpp (greedy,
  at most `max_new_tokens`), one JSON line per prompt with prompt/response token ids (the tokenizer's
  chat template, SmolLM2's default system turn included). Resumable: prompts already in the file are skipped.
- `load_examples(path)`: read the JSONL back.

Knows nothing about the diffusion objective or the model code.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

# ----------------------------------------------------------------------------- topics

TASKS = (
    "bake bread",
    "make pancakes",
    "cook rice on the stove",
    "brew a good cup of coffee",
    "make a fruit smoothie",
    "plan a weekly meal menu",
    "learn to swim",
    "start running as a beginner",
    "train for a 5k race",
    "improve my posture",
    "stretch after a workout",
    "build a home workout routine",
    "plan a trip to Rome",
    "pack for a weekend trip",
    "find cheap flights",
    "prepare for a long road trip",
    "plan a camping trip",
    "learn basic phrases before travelling abroad",
    "fix a flat bicycle tire",
    "change a car tire",
    "jump-start a car battery",
    "unclog a kitchen sink",
    "paint a bedroom wall",
    "hang a picture frame",
    "write a resume",
    "prepare for a job interview",
    "ask for a raise",
    "write a cover letter",
    "negotiate a salary",
    "start a new job well",
    "start a vegetable garden",
    "grow tomatoes on a balcony",
    "care for a houseplant",
    "compost kitchen scraps",
    "plant a tree",
    "keep weeds out of a garden",
    "train a puppy",
    "introduce a new cat to a home",
    "care for a goldfish",
    "walk a dog on a leash",
    "groom a long-haired dog",
    "choose a pet for a small apartment",
    "save money each month",
    "make a household budget",
    "pay off credit card debt",
    "start an emergency fund",
    "reduce my electricity bill",
    "save for a holiday",
    "learn Python",
    "write a simple website",
    "set up a Git repository",
    "debug a program",
    "learn to touch type",
    "back up my computer files",
    "study for an exam",
    "take better notes in class",
    "learn a new language",
    "memorize a speech",
    "read more books",
    "improve my handwriting",
    "organize a closet",
    "clean a kitchen quickly",
    "declutter a small room",
    "do laundry without shrinking clothes",
    "remove a coffee stain",
    "wash windows without streaks",
    "plan a birthday party",
    "host a dinner for friends",
    "write a thank-you note",
    "make new friends in a new city",
    "apologize to a friend",
    "plan a surprise for my partner",
    "fall asleep faster",
    "wake up early",
    "reduce stress at work",
    "start meditating",
    "drink more water",
    "build a morning routine",
    "write a short story",
    "start a blog",
    "take better photos with a phone",
    "learn to draw",
    "learn to play the guitar",
    "write a poem",
    "give a good presentation",
    "run an effective meeting",
    "manage my time better",
    "set goals for the new year",
    "stay focused while working from home",
    "write a clear email",
    "teach a child to ride a bike",
    "help a child with homework",
    "make a family chore chart",
    "plan a rainy day activity for kids",
    "pack a school lunch",
    "read a bedtime story well",
    "recycle plastic correctly",
    "reduce food waste",
    "use less water at home",
    "make my home more energy efficient",
    "start a small business",
    "open a bank account",
    "sew on a button",
    "iron a shirt",
    "tie a tie",
    "fold a fitted sheet",
    "polish leather shoes",
    "knit a scarf",
    "make a paper airplane",
    "build a birdhouse",
    "set up a fish tank",
    "make a candle",
    "build a simple bookshelf",
    "make homemade soap",
    "prepare for a power outage",
    "make a first aid kit",
    "treat a minor burn",
    "prevent a cold",
    "choose running shoes",
    "learn to cook healthy meals",
    "buy a used car",
    "rent my first apartment",
    "move to a new house",
    "choose a laptop",
    "set up a home Wi-Fi network",
    "secure my online accounts",
    "learn chess",
    "solve a Rubik's cube",
    "start a book club",
    "volunteer in my community",
    "learn to juggle",
    "plan a picnic",
)

CONCEPTS = (
    "photosynthesis",
    "gravity",
    "the water cycle",
    "climate change",
    "inflation",
    "interest rates",
    "the immune system",
    "DNA",
    "evolution",
    "electricity",
    "magnetism",
    "the internet",
    "a computer program",
    "machine learning",
    "a black hole",
    "the solar system",
    "the moon's phases",
    "volcanoes",
    "earthquakes",
    "rainbows",
    "the seasons",
    "tides",
    "the greenhouse effect",
    "recycling",
    "vaccines",
    "antibiotics",
    "sleep",
    "memory",
    "democracy",
    "taxes",
    "supply and demand",
    "a budget",
    "compound interest",
    "the stock market",
    "a credit score",
    "insurance",
    "renewable energy",
    "solar panels",
    "wind turbines",
    "batteries",
    "sound waves",
    "light",
    "the speed of light",
    "atoms",
    "molecules",
    "chemical reactions",
    "friction",
    "energy",
    "heat",
    "weather forecasts",
    "clouds",
    "lightning",
    "the ocean currents",
    "coral reefs",
    "rainforests",
    "deserts",
    "bees and pollination",
    "food chains",
    "the heart",
    "the lungs",
    "digestion",
    "muscles",
    "bones",
    "nutrition",
    "exercise",
    "stress",
    "habits",
    "motivation",
    "teamwork",
    "leadership",
    "negotiation",
    "a good argument",
    "the scientific method",
    "a hypothesis",
    "statistics",
    "probability",
    "an average",
    "percentages",
    "fractions",
    "prime numbers",
    "encryption",
    "passwords",
    "cloud computing",
    "a database",
    "an operating system",
    "a search engine",
    "email",
    "social media",
    "video games",
    "3D printing",
    "the printing press",
    "the industrial revolution",
    "ancient Rome",
    "the pyramids",
    "the Olympic Games",
    "the metric system",
    "time zones",
    "maps",
    "the compass",
    "money",
)

PAIRS = (
    ("cats", "dogs"),
    ("tea", "coffee"),
    ("trains", "planes"),
    ("renting", "buying a home"),
    ("reading", "listening to audiobooks"),
    ("running", "cycling"),
    ("summer", "winter"),
    ("cities", "the countryside"),
    ("email", "phone calls"),
    ("paper books", "e-books"),
    ("laptops", "tablets"),
    ("walking", "driving"),
    ("solar power", "wind power"),
    ("saving", "investing"),
    ("working from home", "working in an office"),
    ("baking", "frying"),
    ("weather", "climate"),
    ("viruses", "bacteria"),
    ("frogs", "toads"),
    ("rivers", "lakes"),
    ("oceans", "seas"),
    ("stars", "planets"),
    ("fruits", "vegetables"),
    ("butter", "margarine"),
    ("wool", "cotton"),
    ("chess", "checkers"),
    ("violins", "cellos"),
)

COUNTRIES = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Brazil", "Brasilia"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Australia", "Canberra"),
    ("Russia", "Moscow"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Poland", "Warsaw"),
    ("Ireland", "Dublin"),
    ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Turkey", "Ankara"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"),
    ("Austria", "Vienna"),
    ("Netherlands", "Amsterdam"),
    ("Belgium", "Brussels"),
    ("Denmark", "Copenhagen"),
    ("Hungary", "Budapest"),
    ("Switzerland", "Bern"),
    ("Nigeria", "Abuja"),
    ("Morocco", "Rabat"),
    ("Indonesia", "Jakarta"),
    ("Cuba", "Havana"),
)

HOWTO_TEMPLATES = (
    "How do I {x}?",
    "What is the best way to {x}?",
    "Give me some tips to {x}.",
    "List the steps to {x}.",
    "Make a short plan to {x}.",
    "Outline how to {x}, step by step.",
    "I want to {x}. Where should I start?",
    "What do I need to {x}?",
    "Write a checklist to {x}.",
    "What are common mistakes when trying to {x}?",
)
CONCEPT_TEMPLATES = (
    "Explain {x} in simple terms.",
    "What is {x}?",
    "Describe {x} to a ten-year-old.",
    "Why is {x} important?",
    "Give three facts about {x}.",
    "Summarize how {x} works.",
    "Write a short paragraph about {x}.",
)
PAIR_TEMPLATES = (
    "Compare {a} and {b}.",
    "What are the differences between {a} and {b}?",
    "Which is better, {a} or {b}? Give reasons.",
)
COUNTRY_TEMPLATES = (
    "What is the capital of {c}?",
    "Tell me three things about {c}.",
    "Plan a one-week trip to {c}.",
)


@dataclass(frozen=True)
class Prompt:
    text: str
    kind: str  # howto | concept | compare | country | arithmetic
    topic: str  # the split key: all prompts about one topic fall in the same split
    answer: str | None = None  # exact answer for checkable (arithmetic, capital) questions


def _split_of(topic: str, heldout_percent: int) -> str:
    h = int(hashlib.sha1(topic.encode()).hexdigest()[:8], 16) % 100
    return "heldout" if h < heldout_percent else "train"


def _arithmetic(rng: random.Random, n: int) -> list[Prompt]:
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["+", "-", "*", "apples", "cost"])
        if op == "+":
            text, ans = f"What is {a} + {b}?", a + b
        elif op == "-":
            a, b = max(a, b), min(a, b)
            text, ans = f"What is {a} - {b}?", a - b
        elif op == "*":
            a, b = a % 13 + 2, b % 13 + 2
            text, ans = f"What is {a} times {b}?", a * b
        elif op == "apples":
            text, ans = f"I have {a} apples and buy {b} more. How many apples do I have now?", a + b
        else:
            a, b = a % 20 + 2, b % 9 + 2
            text, ans = f"One notebook costs {b} dollars. How much do {a} notebooks cost?", a * b
        out.append(Prompt(text, "arithmetic", text, str(ans)))
    return out


def make_prompts(seed: int = 0, *, heldout_percent: int = 6, n_arithmetic: int = 400) -> dict[str, list[Prompt]]:
    """All template × topic prompts plus `n_arithmetic` arithmetic questions, shuffled by `seed`,
    split into {"train": [...], "heldout": [...]} by topic hash."""
    rng = random.Random(seed)
    items: list[Prompt] = []
    for x in TASKS:
        items += [Prompt(t.format(x=x), "howto", x) for t in HOWTO_TEMPLATES]
    for x in CONCEPTS:
        items += [Prompt(t.format(x=x), "concept", x) for t in CONCEPT_TEMPLATES]
    for a, b in PAIRS:
        items += [Prompt(t.format(a=a, b=b), "compare", f"{a}|{b}") for t in PAIR_TEMPLATES]
    for c, capital in COUNTRIES:
        items += [Prompt(t.format(c=c), "country", c, capital if "capital" in t else None) for t in COUNTRY_TEMPLATES]
    items += _arithmetic(rng, n_arithmetic)
    seen: set[str] = set()
    unique = [p for p in items if not (p.text in seen or seen.add(p.text))]
    rng.shuffle(unique)
    split: dict[str, list[Prompt]] = {"train": [], "heldout": []}
    for p in unique:
        split[_split_of(p.topic, heldout_percent)].append(p)
    return split


# ----------------------------------------------------------------------------- distillation


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """The instruct model's own chat formatting of one user turn, ending with the assistant header."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _done_texts(path: Path) -> set[str]:
    return set(_texts(path))


def distill(
    prompts: list[Prompt],
    out: str | Path,
    *,
    gguf_path: str | Path,
    tokenizer,
    max_new_tokens: int = 96,
    n_threads: int = 2,
    limit: int | None = None,
    deadline: float | None = None,
    progress: bool = True,
    streams: int = 1,
) -> int:
    """Answer `prompts` with the GGUF instruct model (greedy) and append JSON lines
    {"text", "kind", "topic", "answer", "prompt_ids", "response_ids", "finished"} to `out`.
    `response_ids` ends with the end-of-turn id when the model finished within `max_new_tokens`
    (`finished`). Skips prompts already in the file; stops after `limit` new lines or at `deadline`
    (time.time()). `streams` > 1 answers that many prompts at once through the batched engine
    (`realizers.batched`: one decode step for all of them; 24 streams wrote ~80 tokens/s on 2 cores); lines
    are then written in the order answers finish. Returns the number of lines written now."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _done_texts(out)
    todo = [p for p in prompts if p.text not in done]
    if limit is not None:
        todo = todo[:limit]
    if not todo:
        return 0
    if streams > 1:
        return _distill_batched(todo, out, gguf_path, tokenizer, max_new_tokens, n_threads, deadline, progress, streams)

    from realizers.llamacpp import load_llama

    llm = load_llama(gguf_path, n_ctx=512, n_threads=n_threads)
    eos, special = llm.token_eos(), set(tokenizer.all_special_ids)
    with _Sink(out, len(todo), progress) as sink:
        for p in todo:
            if deadline is not None and time.time() > deadline:
                break
            prompt_ids = chat_prompt_ids(tokenizer, p.text)
            tokens = llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)
            sink.write(p, prompt_ids, *_take_answer(tokens, eos, special, max_new_tokens))
    return sink.written


def distill_torch(
    prompts: list[Prompt],
    out: str | Path,
    *,
    model,
    tokenizer,
    max_new_tokens: int = 96,
    batch_size: int = 64,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    limit: int | None = None,
    deadline: float | None = None,
    progress: bool = True,
) -> int:
    """`distill` with the native backbone as the teacher (`planners.adapt.generate`), `batch_size` prompts per
    batch: the way to distil on a GPU. `model` is the untouched AR model, on its device. `samples` answers per
    prompt (at `temperature` > 0 they differ: more training answers than prompts); prompts that already have
    `samples` lines in `out` are skipped, so an interrupted run resumes. Writes the records `distill` writes;
    any special id ends an answer and is stored as the tokenizer's end-of-turn id. Returns the lines written."""
    from collections import Counter

    import torch

    from planners.adapt.generate import generate

    if samples > 1 and temperature <= 0:
        raise ValueError("samples > 1 needs temperature > 0 (greedy answers to one prompt are all the same)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    have = Counter(_texts(out))
    todo = [p for p in prompts for _ in range(max(samples - have[p.text], 0))]
    if limit is not None:
        todo = todo[:limit]
    if not todo:
        return 0
    eos = tokenizer.eos_token_id
    special = sorted(set(tokenizer.all_special_ids) | {eos})
    ids = {p.text: chat_prompt_ids(tokenizer, p.text) for p in todo}
    todo.sort(key=lambda p: len(ids[p.text]))  # similar lengths share a batch: less padding
    gen = torch.Generator(device=model.device).manual_seed(seed + sum(have.values()))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    with _Sink(out, len(todo), progress) as sink:
        for i in range(0, len(todo), batch_size):
            if deadline is not None and time.time() > deadline:
                break
            batch = todo[i : i + batch_size]
            answers = generate(
                model, [ids[p.text] for p in batch], max_new_tokens=max_new_tokens, stop_ids=special,
                temperature=temperature, top_p=top_p, generator=gen, pad_id=pad,
            )  # fmt: skip
            for p, (resp, finished) in zip(batch, answers, strict=True):
                sink.write(p, ids[p.text], [*resp[:-1], eos] if finished else resp, finished)
    return sink.written


def _texts(path: Path) -> list[str]:
    """The prompt text of every complete line of a distillation file (one per answer)."""
    if not path.exists():
        return []
    texts = []
    for line in path.read_text().splitlines():
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError):
            continue  # a half-written last line from an interrupted run
    return texts


def _take_answer(tokens: Iterable[int], eos: int, special: set[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """Read a greedy answer off `tokens`: (response ids, finished). Any special id ends it and is stored as `eos`
    (finished); otherwise it stops after `max_new_tokens`."""
    resp: list[int] = []
    for t in tokens:
        if t == eos or t in special:
            return [*resp, eos], True
        resp.append(t)
        if len(resp) >= max_new_tokens:
            break
    return resp, False


class _Sink:
    """Appends distilled records to the JSONL file, with a progress bar; `write` may be called from any thread."""

    def __init__(self, out: Path, total: int, progress: bool) -> None:
        import threading

        from tqdm import tqdm

        self.f = out.open("a")
        self.bar = tqdm(total=total, desc="distill", disable=not progress, dynamic_ncols=True)
        self.lock = threading.Lock()
        self.start, self.written, self.tokens = time.time(), 0, 0

    def write(self, p: Prompt, prompt_ids: list[int], resp: list[int], finished: bool) -> None:
        rec = {**asdict(p), "prompt_ids": prompt_ids, "response_ids": resp, "finished": finished}
        with self.lock:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()
            self.written += 1
            self.tokens += len(resp)
            self.bar.update(1)
            self.bar.set_postfix(tok_s=f"{self.tokens / (time.time() - self.start):.0f}")

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self.f.close()


def _distill_batched(
    todo: list[Prompt],
    out: Path,
    gguf_path: str | Path,
    tokenizer,
    max_new_tokens: int,
    n_threads: int,
    deadline: float | None,
    progress: bool,
    streams: int,
) -> int:
    """`distill` through `realizers.batched.BatchedEngine`: `streams` prompts decode together, one thread each
    drains its stream; the same greedy answers up to the batched kernels' rounding."""
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import closing

    from realizers.base import SamplingParams
    from realizers.batched import BatchedEngine

    engine = BatchedEngine(gguf_path, n_ctx=512, max_seqs=streams, n_threads=n_threads, prefix_cache=True)
    eos, special = engine.eos_id, set(tokenizer.all_special_ids)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, extra={"repeat_penalty": 1.0})

    def answer(p: Prompt, sink: _Sink) -> None:
        if deadline is not None and time.time() > deadline:
            return
        prompt_ids = chat_prompt_ids(tokenizer, p.text)
        with closing(engine.generate(prompt_ids, params)) as tokens:  # closing cancels the rest of the stream
            sink.write(p, prompt_ids, *_take_answer(tokens, eos, special, max_new_tokens))

    try:
        with _Sink(out, len(todo), progress) as sink, ThreadPoolExecutor(streams) as pool:
            for fut in [pool.submit(answer, p, sink) for p in todo]:
                fut.result()
    finally:
        engine.close()
    return sink.written


def load_examples(path: str | Path, *, kinds: tuple[str, ...] | None = None) -> list[dict]:
    """Distilled examples from a JSONL file (incomplete trailing lines are ignored)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("response_ids") and (kinds is None or r.get("kind") in kinds):
            rows.append(r)
    return rows


def iter_unique(rows: list[dict]) -> Iterator[dict]:
    seen: set[str] = set()
    for r in rows:
        if r["text"] not in seen:
            seen.add(r["text"])
            yield r
