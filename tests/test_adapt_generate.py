"""planners.adapt.generate: batched AR generation with left padding and a KV cache gives, row by row, what a
plain recompute-everything loop gives for each prompt alone; sampling is seeded and honours top-p; the torch
teacher's distillation writes the same records as the llama.cpp one and resumes."""

from __future__ import annotations

import pytest
import torch

from planners.adapt.generate import generate, sample_next
from planners.model import BackboneConfig, DiffusionBackbone, attention_mask


@pytest.fixture(scope="module")
def tiny():
    """A tiny random model with large weights and an untied head: answers that vary (a default-initialised
    tiny model with tied embeddings mostly repeats its input's last token, which would hide a cache bug)."""
    torch.manual_seed(0)
    cfg = BackboneConfig(
        arch="llama", vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, mask_token_id=3, eos_token_id=2, tie_word_embeddings=False, shift=True,
        attention="block_causal", block_size=4, learned_mask_embedding=True,
    )  # fmt: skip
    model = DiffusionBackbone(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def _alone(model, prompt, n, stop, exclude=()):
    """No cache, no padding: the whole sequence recomputed under causal attention at every step."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        ids = torch.tensor([seq])
        attn = attention_mask(torch.ones(1, len(seq), dtype=torch.bool), pattern="causal", gen_start=0)
        logits = model(ids, attention_mask=attn)[0, -1].float()
        logits[list(exclude)] = float("-inf")
        t = int(logits.argmax())
        out.append(t)
        seq.append(t)
        if t in stop:
            return out, True
    return out, False


def test_batched_greedy_equals_each_prompt_alone(tiny):
    prompts = [[1, 21, 22], [1, 30, 31, 32, 33, 34, 35], [1, 25], [1, 39, 38, 37, 36]]
    stop = [4, 14]
    with torch.no_grad():
        want = [_alone(tiny, p, 12, stop, exclude=[3]) for p in prompts]
    got = generate(tiny, prompts, max_new_tokens=12, stop_ids=stop, exclude_ids=[3])
    assert got == want
    assert all(3 not in ans for ans, _ in got)
    assert {fin for _, fin in got} == {True, False}  # both kinds of ending occur
    # a stop id ends the answer and is kept; unfinished answers have exactly max_new_tokens ids
    for ans, fin in got:
        assert (fin and ans[-1] in stop and not set(ans[:-1]) & set(stop)) or (not fin and len(ans) == 12)


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[4.0, 3.9, -5.0, -5.0], [0.0, 0.0, 0.0, 9.0]])
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = torch.stack([sample_next(logits, temperature=1.0, top_p=0.9, generator=g1) for _ in range(50)])
    b = torch.stack([sample_next(logits, temperature=1.0, top_p=0.9, generator=g2) for _ in range(50)])
    assert torch.equal(a, b)
    assert set(a[:, 0].tolist()) == {0, 1}  # the two near-equal tokens share the nucleus
    assert set(a[:, 1].tolist()) == {3}  # one token holds > 0.9 of the mass: nothing else is drawn
    assert sample_next(logits, temperature=0.0, top_p=0.5, generator=None).tolist() == [0, 3]


def test_generate_rejects_bad_input(tiny):
    with pytest.raises(ValueError, match="non-empty"):
        generate(tiny, [[1, 2], []], max_new_tokens=4, stop_ids=[2])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tiny, [[1, 2]], max_new_tokens=0, stop_ids=[2])


def test_torch_teacher_writes_what_the_llama_cpp_teacher_writes(tmp_path, smol_dir, smol_tokenizer, llama_cpp_safe):
    """`distill_torch` (the GPU teacher) on the packaged SmolLM2 writes the llama.cpp teacher's records: the same
    prompts and chat ids, greedy answers that agree at the start (the two engines round differently), answers
    that end with the end-of-turn id when finished; it resumes, and draws several answers per prompt when
    sampling."""
    from planners.adapt.data import distill, distill_torch, load_examples, make_prompts
    from planners.assets import smollm2_gguf_path
    from planners.loading import load_backbone

    prompts = make_prompts(0)["heldout"][:3]
    model = load_backbone(smol_dir, mask_token_id=16).eval()
    kw = dict(tokenizer=smol_tokenizer, max_new_tokens=16, progress=False)
    assert distill(prompts, tmp_path / "llama.jsonl", gguf_path=smollm2_gguf_path(), n_threads=1, **kw) == 3
    assert distill_torch(prompts, tmp_path / "torch.jsonl", model=model, batch_size=2, **kw) == 3
    assert distill_torch(prompts, tmp_path / "torch.jsonl", model=model, batch_size=2, **kw) == 0  # resumes
    ref = {r["text"]: r for r in load_examples(tmp_path / "llama.jsonl")}
    got = {r["text"]: r for r in load_examples(tmp_path / "torch.jsonl")}
    assert set(got) == set(ref) == {p.text for p in prompts}
    eos = smol_tokenizer.eos_token_id
    for text, r in got.items():
        assert set(r) == set(ref[text])
        assert r["prompt_ids"] == ref[text]["prompt_ids"] and r["kind"] == ref[text]["kind"]
        assert r["response_ids"][:4] == ref[text]["response_ids"][:4]
        assert r["finished"] == (r["response_ids"][-1] == eos)
        assert len(r["response_ids"]) <= 16
    n = distill_torch(prompts[:2], tmp_path / "s.jsonl", model=model, samples=3, temperature=0.8, **kw)
    assert n == 6
    rows = load_examples(tmp_path / "s.jsonl")
    assert sorted(r["text"] for r in rows) == sorted([p.text for p in prompts[:2]] * 3)
    with pytest.raises(ValueError, match="temperature"):
        distill_torch(prompts, tmp_path / "x.jsonl", model=model, samples=2, **kw)


def test_carry_packs_parts_and_joins_them_back_checked(tmp_path):
    """planners.adapt.carry: a file cut into parts of at most N MiB comes back byte for byte; a missing or
    damaged part is an error, not a wrong model."""
    import os

    from planners.adapt.carry import join, pack

    src = tmp_path / "w.gguf"
    src.write_bytes(os.urandom(int(2.5 * (1 << 20))))
    folders = pack(src, tmp_path / "carry", part_mib=1)
    assert [d.name for d in folders] == ["p0", "p1", "p2"]
    assert all(f.stat().st_size <= 1 << 20 for d in folders for f in d.glob("*.part*"))
    stash = tmp_path / "stash"
    stash.mkdir()
    for d in folders:
        for f in d.iterdir():
            (stash / f.name).write_bytes(f.read_bytes())
    assert join(stash, tmp_path / "back.gguf").read_bytes() == src.read_bytes()
    part = stash / "w.gguf.part1"
    data = bytearray(part.read_bytes())
    data[7] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match"):
        join(stash, tmp_path / "bad.gguf")
    part.unlink()
    with pytest.raises(FileNotFoundError, match="part1"):
        join(stash, tmp_path / "bad.gguf")


def test_device_choice_is_explicit(tmp_path):
    """--device auto takes the CPU without CUDA; a CUDA device that is not there, an unknown device type and
    sampled answers at temperature 0 stop the run with a message instead of falling back silently."""
    from planners.adapt.cli import main, pick_device

    if not torch.cuda.is_available():
        assert pick_device("auto").type == "cpu"
        with pytest.raises(SystemExit, match="no CUDA device"):
            pick_device("cuda:0")
    with pytest.raises(SystemExit, match="use auto, cpu, cuda"):
        pick_device("meta")
    with pytest.raises(SystemExit, match="needs --temperature"):
        main(["--out", str(tmp_path / "r"), "--smoke", "--samples-per-prompt", "2", "--no-progress"])
