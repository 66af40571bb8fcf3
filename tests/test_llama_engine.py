"""The llama.cpp planner engine (`planners.llama_engine`) against the torch backbone on the same weights, and the
GGUF export (`planners.export_gguf`) it runs.

Real code paths throughout: a tiny random block-causal backbone with SmolLM2's vocabulary (tests/conftest.py),
exported to an f32 GGUF with the packaged SmolLM2's tokenizer metadata, run by llama.cpp through the project's
loader. Native decodes first run once in a child process (`engine_probe`), so a llama.cpp crash fails these tests
by name instead of ending the test run.
"""

from __future__ import annotations

import dataclasses
import textwrap

import numpy as np
import pytest
import torch
from conftest import tiny_llama_backbone

from tests.test_realizer_embedded import needs_smollm2

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny_lora(smol_tokenizer):
    """The tiny backbone with a random (non-zero) LoRA adapter and mask embedding."""
    m = tiny_llama_backbone(len(smol_tokenizer), mask_token_id=16, eos_token_id=smol_tokenizer.eos_token_id, seed=3)
    m.add_lora(4, 8.0, ("q", "k", "v", "o", "gate", "up", "down"))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_" in name or name == "mask_embedding":
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


@pytest.fixture(scope="module")
def tiny_gguf(tiny_lora, tmp_path_factory):
    from planners.assets import smollm2_gguf_path
    from planners.export_gguf import export

    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    return export(tiny_lora, path, weight_type="f32", tokenizer_gguf=smollm2_gguf_path(), name="tiny")


_PROBE = """
import sys, torch
from planners.llama_engine import LlamaCppEngine
eng = LlamaCppEngine(sys.argv[1] if len(sys.argv) > 1 else {path!r}, n_threads=1, extra_bufts="off")
valid = torch.ones(1, 24, dtype=torch.bool)
cache = eng.new_cache(valid, gen_start=16)
ids = torch.randint(100, 1000, (1, 24)); ids[:, 16:] = eng.config.mask_token_id
out = eng(ids, cache=cache, cache_start=0, final=16)
assert out.shape == (1, 24, eng.n_vocab) and torch.isfinite(out[:, 15:]).all()
print("ok")
"""


@pytest.fixture(scope="module")
def engine_probe(tiny_gguf):
    """Load the tiny GGUF and decode a window in a child process first: a native crash fails here, by name."""
    from realizers.llamacpp import run_child

    root = str(__import__("pathlib").Path(__file__).resolve().parent.parent)
    code = f"import sys; sys.path.insert(0, {root!r})\n" + textwrap.dedent(_PROBE.format(path=str(tiny_gguf)))
    result = run_child(code, timeout=120)
    if not result.ok:
        pytest.fail(f"the llama.cpp planner engine died in a child process: {result.describe()}")
    return True


@pytest.fixture(scope="module")
def engine(tiny_gguf, engine_probe):
    from planners.llama_engine import LlamaCppEngine

    eng = LlamaCppEngine(tiny_gguf, n_threads=1, extra_bufts="off")
    yield eng
    eng.close()


# ----------------------------------------------------------------------------- export


def test_export_round_trips(tiny_lora, tiny_gguf):
    from planners.export_gguf import _permute, gguf_tensors, read_backbone_config, read_tensors

    want = gguf_tensors(tiny_lora)
    got = read_tensors(tiny_gguf)
    assert set(got) == set(want)
    for name, t in want.items():
        np.testing.assert_array_equal(got[name], t.numpy(), err_msg=name)
    # what went in is the merged adapter, the mask row and the rope layout llama.cpp expects
    blk = tiny_lora.layers[0].attn
    lin = blk.q_proj
    merged = lin.base.weight + lin.scale * lin.lora_b @ lin.lora_a
    torch.testing.assert_close(torch.from_numpy(got["blk.0.attn_q.weight"]), _permute(merged.detach(), 4))
    unpermuted = _permute(_permute(merged.detach(), 4), 4)  # two half-swaps per head are not the identity ...
    assert not torch.equal(unpermuted, merged.detach())  # ... so the test above really checks the permutation
    np.testing.assert_array_equal(got["token_embd.weight"][16], tiny_lora.mask_embedding.detach().numpy())
    np.testing.assert_array_equal(got["output.weight"], tiny_lora.embed_tokens.weight.detach().numpy())
    c = read_backbone_config(tiny_gguf)
    assert c == tiny_lora.config
    # and back: the native GGUF reader (planners.loading, the gguf package alone) undoes the rope permutation
    from planners.loading import _state_from_gguf

    hf, state = _state_from_gguf(tiny_gguf)
    assert torch.equal(state["model.layers.0.self_attn.q_proj.weight"], merged.detach())
    k = blk.k_proj
    k_merged = (k.base.weight + k.scale * k.lora_b @ k.lora_a).detach()
    assert torch.equal(state["model.layers.0.self_attn.k_proj.weight"], k_merged)
    assert (hf["num_attention_heads"], hf["num_key_value_heads"]) == (c.num_heads, c.num_kv_heads)
    assert hf["num_hidden_layers"] == c.num_layers and not hf["tie_word_embeddings"]


def test_export_carries_the_tokenizer(tiny_gguf):
    from gguf import GGUFReader

    from planners.assets import smollm2_gguf_path

    ours, ref = GGUFReader(str(tiny_gguf)).fields, GGUFReader(str(smollm2_gguf_path())).fields
    keys = [k for k in ref if k.startswith("tokenizer.")]
    assert "tokenizer.chat_template" in keys and "tokenizer.ggml.tokens" in keys
    for k in keys:
        assert ours[k].contents() == ref[k].contents(), k


def test_export_refuses_unknown_weight_type(tiny_lora, tmp_path):
    from planners.export_gguf import export

    with pytest.raises(ValueError, match="q4_k_m"):
        export(tiny_lora, tmp_path / "x.gguf", weight_type="q3", tokenizer_gguf="unused")


# ----------------------------------------------------------------------------- engine vs torch


def _prompts(tok):
    from planners.adapt.data import chat_prompt_ids

    msgs = ["How do I make a cup of tea?", "Name three rivers in Europe and say where they flow."]
    return [chat_prompt_ids(tok, m) for m in msgs]


def test_window_logits_match_torch(engine, tiny_lora, smol_tokenizer):
    """Every window the prefix cache asks for, block by block: the engine's logits are torch's."""
    from planners.model import attention_mask

    ids = list(_prompts(smol_tokenizer)[0])
    g = len(ids)
    x = torch.tensor([ids + torch.randint(100, 5000, (24,)).tolist()])
    x[0, g + 10] = 16  # a mask token inside the second block
    valid = torch.ones_like(x, dtype=torch.bool)
    attn = attention_mask(valid, pattern="block_causal", gen_start=g, block_size=8)
    with torch.no_grad():
        ref = tiny_lora(x, attention_mask=attn).float()  # (1, L, V): no cache, the whole sequence
    cache = engine.new_cache(valid, gen_start=g)
    fresh = 0
    for lo in range(g, g + 24, 8):
        hi = lo + 8
        for a in (fresh, lo - 1):  # the refresh window, then a step window
            out = engine(x[:, a:hi], cache=cache, cache_start=a, final=lo)
            rows = slice(max(a, g - 1) - a, hi - a)  # prompt rows before the last are not computed (NaN)
            torch.testing.assert_close(out[:, rows], ref[:, a:hi][:, rows], atol=2e-4, rtol=1e-4)
        fresh = lo


def _fold_window(engine, x, g):
    """The prompt and first block final, then the second block becomes final while the third is decoded (one
    folded decode when the engine folds): the window's logits."""
    cache = engine.new_cache(torch.ones_like(x, dtype=torch.bool), gen_start=g)
    engine(x[:, : g + 8], cache=cache, cache_start=0, final=g)
    return engine(x[:, g : g + 16], cache=cache, cache_start=g, final=g + 8)


def test_fold_is_exact_and_the_check_tells_the_orders_apart(engine, tiny_lora, smol_tokenizer):
    """A newly final block and the next block's first step share one decode (two seq ids per row). The engine's
    check finds the seq-id order that is exact on this llama.cpp build; the other order lets the final block see
    the block after it, and the check's comparison sees that."""
    from planners.model import attention_mask

    assert engine.fold_order(), "this llama.cpp build masks neither seq id order exactly: the engine cannot fold"
    ids = list(_prompts(smol_tokenizer)[0])
    g = len(ids)
    x = torch.tensor([ids + torch.randint(100, 5000, (16,), generator=torch.Generator().manual_seed(1)).tolist()])
    x[0, g + 12] = 16
    attn = attention_mask(torch.ones_like(x, dtype=torch.bool), pattern="block_causal", gen_start=g, block_size=8)
    with torch.no_grad():
        ref = tiny_lora(x, attention_mask=attn).float()[:, g : g + 16]
    torch.testing.assert_close(_fold_window(engine, x, g), ref, atol=2e-4, rtol=1e-4)
    right = engine._own_first
    try:
        engine._own_first = not right
        wrong = _fold_window(engine, x, g)
        assert (wrong[:, :8] - ref[:, :8]).abs().max() > 1e-2  # the final block saw the block after it
    finally:
        engine._own_first = right


def test_the_micro_benchmark_pass_runs_and_leaves_only_the_context(engine):
    """benchmarks/bench_plan_vs_ar.py's per-pass micro-benchmark drives the engine's own decode path: it runs
    repeatedly, and each pass removes its block, so the KV cache keeps the context alone."""
    from conftest import load_benchmark

    run = load_benchmark("bench_plan_vs_ar")._llama_pass(engine, 4, 16)
    for _ in range(3):
        run()
    cx = run.cache.ctx
    for seq in (0, cx.scratch):
        assert engine._ll.llama_memory_seq_pos_max(cx.mem, seq) == 15  # positions 0..15: the context only


def test_sparse_outputs_compute_only_the_rows_asked_for(engine, smol_tokenizer):
    """`outputs`: the rows asked for are the full call's logits, exactly; the others are zeros."""
    ids = list(_prompts(smol_tokenizer)[0])
    g = len(ids)
    x = torch.tensor([ids + torch.randint(100, 5000, (16,), generator=torch.Generator().manual_seed(2)).tolist()])
    full = _fold_window(engine, x, g)
    want = torch.zeros(1, 16, dtype=torch.bool)
    want[0, [3, 9, 10, 14]] = True
    cache = engine.new_cache(torch.ones_like(x, dtype=torch.bool), gen_start=g)
    engine(x[:, : g + 8], cache=cache, cache_start=0, final=g)
    got = engine(x[:, g : g + 16], cache=cache, cache_start=g, final=g + 8, outputs=want)
    torch.testing.assert_close(got[want], full[want], rtol=0, atol=0)
    # the last final position (row 7) is always computed: the next block's first prediction, kept by the engine
    torch.testing.assert_close(got[:, 7], full[:, 7], rtol=0, atol=0)
    skipped = ~want
    skipped[0, 7] = False
    assert not got[skipped].any()
    nxt = engine(x[:, g + 7 : g + 16], cache=cache, cache_start=g + 7, final=g + 8)
    torch.testing.assert_close(nxt[:, 0], full[:, 7], rtol=0, atol=0)


def test_interleaved_runs_keep_their_own_cache(engine, smol_tokenizer):
    """Two denoising runs in flight on one engine (two threads' plans) each hold their own llama.cpp context."""
    p0, p1 = _prompts(smol_tokenizer)
    xs = [torch.tensor([p + [16] * 8]) for p in (p0, p1)]
    solo = []
    for x in xs:
        c = engine.new_cache(torch.ones_like(x, dtype=torch.bool), gen_start=x.shape[1] - 8)
        solo.append(engine(x, cache=c, cache_start=0, final=x.shape[1] - 8)[:, -8:])
    caches = [engine.new_cache(torch.ones_like(x, dtype=torch.bool), gen_start=x.shape[1] - 8) for x in xs]
    first = [engine(x, cache=c, cache_start=0, final=x.shape[1] - 8) for x, c in zip(xs, caches, strict=True)]
    for x, c, f, s in zip(xs, caches, first, solo, strict=True):
        torch.testing.assert_close(f[:, -8:], s, rtol=0, atol=0)
        g = x.shape[1] - 8
        torch.testing.assert_close(engine(x[:, g - 1 :], cache=c, cache_start=g - 1, final=g)[:, 1:], s)


@pytest.mark.parametrize(
    "rule",
    [
        dict(commit="static"),
        dict(commit="threshold"),
        dict(commit="learned", threshold=0.5),  # the product's default rule
        dict(commit="factor", factor=2.0, boost="credit", eos_early_stop="inside"),
        # adaptive blocks split training blocks: the engine's blocks follow the sampler's, as torch's attention does
        dict(commit="threshold", blocks="adaptive", delimiter_ids=tuple(range(0, 49152, 3)), delimiter_threshold=0.01),
    ],
    ids=lambda d: "-".join(str(v) for k, v in d.items() if k != "delimiter_ids"),
)
def test_engine_gives_torch_tokens(engine, tiny_lora, smol_tokenizer, rule):
    from planners.sampler import SamplerConfig, sample

    cfg = SamplerConfig(gen_length=32, steps=32, block_length=8, threshold=0.5, cache="prefix", record_trajectory=True)
    cfg = SamplerConfig(**{**cfg.to_dict(), **rule})
    prompts = _prompts(smol_tokenizer)
    for batch in ([prompts[0]], prompts):  # one row, and two rows of different lengths (left padding)
        want = sample(tiny_lora, batch, cfg)
        got = sample(engine, batch, cfg)
        assert got.tokens.tolist() == want.tokens.tolist()
        assert got.nfe == want.nfe and got.tokens_per_step.tolist() == want.tokens_per_step.tolist()
        for tw, tg in zip(want.trajectories, got.trajectories, strict=True):  # the recorder saw the same predictions
            assert [s.x0_hat for s in tg.steps] == [s.x0_hat for s in tw.steps]


def test_engine_infill_matches_torch(engine, tiny_lora, smol_tokenizer):
    """A redraw: some blocks have no masks (skipped) and the next refresh spans several final blocks."""
    from planners.sampler import SamplerConfig, infill

    cfg = SamplerConfig(gen_length=32, steps=32, block_length=8, cache="prefix")
    template = torch.randint(100, 5000, (32,)).tolist()
    for p in (17, 18, 30):
        template[p] = 16
    prompt = _prompts(smol_tokenizer)[:1]
    assert infill(engine, template, cfg, prompts=prompt).tokens.tolist() == (
        infill(tiny_lora, template, cfg, prompts=prompt).tokens.tolist()
    )


def test_engine_needs_the_prefix_cache(engine, smol_tokenizer):
    from planners.sampler import SamplerConfig, sample

    with pytest.raises(ValueError, match="cache='prefix'"):
        sample(engine, _prompts(smol_tokenizer)[:1], SamplerConfig(gen_length=8, steps=8, block_length=8))


def test_planner_on_the_engine(engine, tiny_lora, smol_tokenizer):
    """The Planner runs unchanged on the engine (plan, on_block streaming, redraw)."""
    from planners.planner import Planner
    from planners.sampler import SamplerConfig

    cfg = SamplerConfig(gen_length=16, steps=16, block_length=8, cache="prefix", record_trajectory=True)
    torch_planner = Planner(tiny_lora, smol_tokenizer, cfg, name="tiny-torch")
    llama_planner = Planner(engine, smol_tokenizer, cfg, name="tiny-llama")
    seen = []
    a = torch_planner.plan("How do I make a cup of tea?")
    b = llama_planner.plan("How do I make a cup of tea?", on_block=lambda p: seen.append(p.block))
    assert b.span == a.span and seen
    assert llama_planner.redraw(b, [0, 9]).span == torch_planner.redraw(a, [0, 9]).span


# ----------------------------------------------------------------------------- engine choice


def test_engine_setting_is_validated():
    from hybrid.config import HybridConfig

    assert HybridConfig.load(**{"planner.engine": "llama_cpp"}).planner.engine == "llama_cpp"
    with pytest.raises(Exception, match="auto"):
        HybridConfig.load(**{"planner.engine": "onnx"})


def test_engine_choice():
    from planners.planner import choose_engine

    assert choose_engine("torch", device="cpu", llama_arch=True) == "torch"
    assert choose_engine("auto", device="cuda", llama_arch=True) == "torch"
    assert choose_engine("auto", device="cpu", llama_arch=False) == "torch"  # LLaDA / Dream stay on torch
    with pytest.raises(ValueError, match="llama_cpp"):
        choose_engine("llama_cpp", device="cpu", llama_arch=False)
    with pytest.raises(ValueError, match="cpu"):
        choose_engine("llama_cpp", device="cuda", llama_arch=True)


def test_planner_load_picks_the_engine(tmp_path, monkeypatch, tiny_lora, engine_probe):
    """Planner.load(engine="llama_cpp") on a local llama checkpoint: exports once (cache dir), runs llama.cpp."""
    from planners.assets import smollm2_hf_dir
    from planners.llama_engine import LlamaCppEngine
    from planners.loading import save_adapter, save_checkpoint
    from planners.planner import Planner

    monkeypatch.setenv("HYBRID_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = save_checkpoint(tiny_lora, tmp_path / "ckpt")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / f).write_bytes((smollm2_hf_dir() / f).read_bytes())
    save_adapter(tiny_lora, tmp_path / "adapter.safetensors")
    p = Planner.load(ckpt, adapter=tmp_path / "adapter.safetensors", engine="llama_cpp", engine_weights="f32")
    assert isinstance(p.model, LlamaCppEngine)
    exported = list((tmp_path / "cache" / "planner-gguf").glob("*.gguf"))
    assert len(exported) == 1
    t = Planner.load(ckpt, adapter=tmp_path / "adapter.safetensors", engine="torch", sampler=p.sampler)
    assert p.plan("How do I make a cup of tea?").span == t.plan("How do I make a cup of tea?").span
    p.model.close()

    # a second load finds the export: it reads no torch weights and plans the same
    def no_weights(*_a, **_k):
        raise AssertionError("the cached export was there: no torch weights should be read")

    monkeypatch.setattr("planners.planner.load_backbone", no_weights)
    again = Planner.load(ckpt, adapter=tmp_path / "adapter.safetensors", engine="llama_cpp", engine_weights="f32")
    assert list((tmp_path / "cache" / "planner-gguf").glob("*.gguf")) == exported
    assert again.model.config == p.model.config
    assert again.plan("How do I make a cup of tea?").span == t.plan("How do I make a cup of tea?").span
    again.model.close()


def test_backbone_config_is_the_loaded_models_without_reading_weights(tmp_path, tiny_lora, tiny_gguf, monkeypatch):
    """`backbone_config` (what a cached export needs) equals `load_backbone(...).config` for the same arguments:
    checkpoint directory with and without a merged adapter, a GGUF, and the shipped planner."""
    from transformers import AutoTokenizer

    import planners.loading as loading
    from planners.assets import DEFAULT_ADAPTER, SMOLLM2_MASK_TOKEN, smollm2_hf_dir
    from planners.loading import backbone_config, load_backbone, save_adapter, save_checkpoint

    ckpt = save_checkpoint(tiny_lora, tmp_path / "ckpt")
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(tiny_lora, adapter)
    mask = tiny_lora.config.mask_token_id
    smol = smollm2_hf_dir()
    smol_mask = int(AutoTokenizer.from_pretrained(str(smol)).convert_tokens_to_ids(SMOLLM2_MASK_TOKEN))
    cases = [
        (ckpt, dict(mask_token_id=mask)),
        (ckpt, dict(mask_token_id=mask, adapter=adapter)),
        (ckpt, dict(mask_token_id=mask, adapter=adapter, merge_adapter=True)),
        (ckpt, dict(mask_token_id=mask, block_size=4, attention="full")),
        (tiny_gguf, dict(mask_token_id=mask)),
        (smol, dict(mask_token_id=smol_mask, adapter=DEFAULT_ADAPTER, merge_adapter=True)),
    ]
    want = [load_backbone(path, **kw).config for path, kw in cases]
    monkeypatch.setattr(loading, "_read_safetensors_dir", None)  # any weight read now raises
    monkeypatch.setattr(loading, "_state_from_gguf", None)
    monkeypatch.setattr(loading, "load_adapter", None)
    for (path, kw), w in zip(cases, want, strict=True):
        assert backbone_config(path, **kw) == w, (path, kw)
    assert want[2].lora_rank == 0 and want[1].lora_rank == 4  # merged / not: the cases differ where it matters


@pytest.mark.slow
def test_shipped_planner_same_plans_on_f32_gguf(engine_probe):
    """The shipped planner, exported to f32 GGUF (cached after the first run): llama.cpp drafts torch's plans."""
    from planners.planner import Planner
    from planners.sampler import SamplerConfig

    cfg = SamplerConfig(gen_length=16, steps=16, block_length=8, commit="threshold", cache="prefix")
    t = Planner.load(engine="torch", sampler=cfg, device="cpu")
    lc = Planner.load(engine="llama_cpp", engine_weights="f32", sampler=cfg, device="cpu", threads=1)
    try:
        for q in ("How do I make a cup of tea?", "What is the difference between a lake and a sea?"):
            for c in (cfg, dataclasses.replace(cfg, commit="static")):
                assert lc.plan(q, config=c).span == t.plan(q, config=c).span
    finally:
        lc.model.close()


# ----------------------------------------------------------------------------- threads


def test_threads_are_asked_per_decode_and_change_no_token(engine, smol_tokenizer):
    """`threads_fn` is read before every decode (`_Context.set_threads`); plans are the same whatever it says."""
    from planners.planner import Planner
    from planners.sampler import SamplerConfig

    cfg = SamplerConfig(gen_length=16, steps=16, block_length=8, cache="prefix")
    planner = Planner(engine, smol_tokenizer, cfg, name="tiny-llama")
    fixed = planner.plan("How do I make a cup of tea?")
    asked = []
    engine.threads_fn = lambda: asked.append(len(asked)) or (1 + len(asked) % 2)  # 2, 1, 2, ...
    try:
        varied = planner.plan("How do I make a cup of tea?")
    finally:
        engine.threads_fn = None
    assert varied.span == fixed.span
    assert len(asked) >= varied.stats["nfe"]  # at least one question per forward pass


@needs_smollm2
def test_share_cores_gives_the_planner_every_core_while_the_realizer_is_idle(engine, smol_tokenizer, llama_cpp_safe):
    import os

    from hybrid.config import HybridConfig
    from hybrid.runtime import share_cores
    from hybrid.state import HybridContext
    from planners.planner import Planner
    from planners.sampler import SamplerConfig
    from realizers.base import SamplingParams
    from realizers.embedded import LlamaCppRealizer

    planner = Planner(engine, smol_tokenizer, SamplerConfig(gen_length=8, steps=8, block_length=8), name="tiny")
    realizer = LlamaCppRealizer(max_seqs=2, n_ctx=256)
    try:
        pinned = HybridContext(config=HybridConfig.load(**{"planner.threads": 1}), planner=planner, realizer=realizer)
        assert not share_cores(pinned) and engine.threads_fn is None  # an explicit planner.threads is kept
        ctx = HybridContext(config=HybridConfig.load(), planner=planner, realizer=realizer)
        assert share_cores(ctx)
        assert engine.threads_fn() == (os.cpu_count() or 1)  # nothing to decode: every core
        stream = realizer.engine.generate(realizer.prompt_ids([{"role": "user", "content": "Hi"}]), SamplingParams(8))
        next(stream)
        assert realizer.engine.busy and engine.threads_fn() == engine.n_threads  # decoding: the planner's share
        stream.close()
    finally:
        engine.threads_fn = None
        realizer.close()
