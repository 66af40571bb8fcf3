"""planners.adapt on a tiny random Llama-layout model: the two-copy mask, the loss going down, resume, adapter I/O."""

from __future__ import annotations

import json

import pytest
import torch

from planners.adapt.cli import LORA_TARGETS, export_adapter, main, synthetic_rows, tiny_base
from planners.adapt.evaluate import heldout_loss
from planners.adapt.objective import CLEAN, NOISY, PROMPT, certainty_loss, layout, loss_fn, make_batch, pad_response
from planners.adapt.train import TrainConfig, train
from planners.loading import load_backbone


def _model(base):
    m = load_backbone(base, mask_token_id=3, attention="block_causal", block_size=4)
    m.add_lora(4, 4.0, LORA_TARGETS)
    return m


def test_two_copy_mask_small_case():
    # prompt 2 tokens, response 4 tokens in blocks of 2, one padding column: L = 2 + 4 + 4 + 1 = 11
    kind, pos, attn = layout(torch.tensor([2]), torch.tensor([4]), 11, 2, "block_causal")
    P, N, C = PROMPT, NOISY, CLEAN
    assert kind[0].tolist() == [P, P, N, N, N, N, C, C, C, C, 3]
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 0]  # both copies share positions
    # columns: p0 p1 | n0 n1 n2 n3 | c0 c1 c2 c3 | pad
    expect = [
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # p0: causal prompt
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # p1
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # n0: prompt + its own noisy block
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # n1
        [1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0],  # n2: prompt + clean block 0 + its own noisy block
        [1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0],  # n3
        [1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0],  # c0: clean copy, block-causal (bidirectional in a block)
        [1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0],  # c1
        [1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0],  # c2
        [1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0],  # c3
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],  # pad: only itself (no all-False row)
    ]
    assert attn[0, 0].int().tolist() == expect
    _, _, causal = layout(torch.tensor([2]), torch.tensor([4]), 11, 2, "causal")
    assert causal[0, 0, 6].int().tolist() == [1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0]  # c0 no longer sees c1
    assert causal[0, 0, 8].int().tolist() == [1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0]
    assert causal[0, 0, 4].tolist() == attn[0, 0, 4].tolist()  # the noisy copy is unchanged


def test_shifted_targets_read_the_right_logits():
    g = torch.Generator().manual_seed(0)
    b = make_batch([([7, 8], [10, 11, 12, 13])], block_size=2, mask_id=3, pad_id=2, generator=g, fixed_ratio=1.0)
    # all masked: token r is read at noisy r-1 inside a block, at clean r-1 (or the last prompt) at a block start
    assert b.tgt.tolist() == [10, 11, 12, 13]
    assert b.src.tolist() == [1, 2, 7, 4]
    assert b.input_ids[0].tolist() == [7, 8, 3, 3, 3, 3, 10, 11, 12, 13]
    assert pad_response([5, 6, 2], 4, 2, True) == [5, 6, 2, 2]
    assert pad_response([5, 6, 7, 8, 9], 4, 2, False) == [5, 6, 7, 8]


def test_training_lowers_loss_resumes_and_round_trips(tmp_path):
    torch.set_num_threads(1)
    base = tiny_base(tmp_path / "base")
    rows, held = synthetic_rows(64, seed=0), synthetic_rows(12, seed=1)
    model = _model(base)
    before = heldout_loss(model, held)
    out = tmp_path / "run"
    cfg = TrainConfig(out=str(out), lr=1e-2, max_steps=30, token_budget=512, eval_every=1000, warmup_steps=3,
                      threads=1, progress=False, ckpt_seconds=1e9)  # fmt: skip
    state = train(cfg, model, rows, held, log=lambda m: None)
    assert state["step"] == 30
    after = heldout_loss(model, held)
    assert after < 0.8 * before, (before, after)

    # resume: a fresh process-equivalent picks the checkpoint up at step 30 and goes on to 40
    logs: list[str] = []
    model2 = _model(base)
    cfg2 = TrainConfig(**{**cfg.__dict__, "max_steps": 40})
    state2 = train(cfg2, model2, rows, held, resume=True, log=logs.append)
    assert any("resumed" in m and "step 30" in m for m in logs)
    assert state2["step"] == 40
    steps = [h["step"] for h in state2["history"] if "loss" in h]
    assert steps == sorted(steps) and steps[-1] == 40 and 30 in steps

    # the written adapter round-trips through load_backbone(adapter=...) (fp32 and the bf16 export)
    adapter = out / "adapter.safetensors"
    meta = json.loads(adapter.with_suffix(".json").read_text())
    assert meta["backbone"]["lora_rank"] == 4 and meta["training"]["steps"] == 40
    loaded = load_backbone(base, adapter=adapter)
    for k, v in model2.adapter_state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    ids = torch.tensor([[1, 22, 23, 3, 3, 3, 3]])
    torch.testing.assert_close(loaded(ids), model2.eval()(ids))
    small = export_adapter(adapter, tmp_path / "ship" / "p.safetensors")
    loaded16 = load_backbone(base, adapter=small)
    torch.testing.assert_close(loaded16(ids), model2(ids), atol=0.05, rtol=0.05)


def test_cli_smoke(tmp_path):
    assert main(["--out", str(tmp_path), "--smoke", "--max-steps", "6", "--no-progress", "--threads", "1"]) == 0
    assert (tmp_path / "adapter.safetensors").exists() and (tmp_path / "history.json").exists()


def test_certainty_term_sharpens_only_right_predictions():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 2.0, 1.0]], requires_grad=True)
    tgt = torch.tensor([0, 2, 0])  # row 0 right; rows 1 and 2 wrong
    loss, n = certainty_loss(logits, tgt, temperature=1.0)
    p = torch.softmax(logits[0].detach(), -1)
    assert n == 1
    torch.testing.assert_close(loss.detach(), -(p * p.log()).sum())
    loss.backward()
    assert logits.grad[1:].abs().sum() == 0  # wrong predictions are the cross-entropy's business
    assert torch.softmax(logits[0].detach() - logits.grad[0], -1)[0] > p[0]  # a step makes the right one surer
    none, n0 = certainty_loss(logits[1:], tgt[1:])
    assert n0 == 0 and float(none.detach()) == 0.0


def test_certainty_forcing_lowers_the_entropy_of_right_predictions(tmp_path):
    """Same data, seed and steps with and without the certainty term: with it, held-out masked predictions that
    are right are made with lower entropy (what lets a threshold commit more of them per pass)."""
    torch.set_num_threads(1)
    base = tiny_base(tmp_path / "base")
    rows, held = synthetic_rows(64, seed=0), synthetic_rows(12, seed=1)

    def right_entropy(weight: float) -> float:
        model = _model(base)
        cfg = TrainConfig(out=str(tmp_path / f"w{weight}"), lr=1e-2, max_steps=40, token_budget=512,
                          eval_every=1000, warmup_steps=3, threads=1, progress=False, ckpt_seconds=1e9,
                          certainty_weight=weight)  # fmt: skip
        train(cfg, model, rows, held, log=lambda m: None)
        c = model.config
        b = make_batch(held, block_size=c.block_size, mask_id=c.mask_token_id, pad_id=c.eos_token_id,
                       generator=torch.Generator().manual_seed(0), fixed_ratio=0.5)  # fmt: skip
        with torch.no_grad():
            _, st = loss_fn(model.eval(), b, certainty_weight=1.0, certainty_temperature=1.0)
        assert 0 < st["right"] <= 1
        return st["cert"]

    plain, forced = right_entropy(0.0), right_entropy(2.0)
    assert forced < 0.8 * plain, (plain, forced)


def test_cli_continues_from_an_adapter_and_keeps_the_last(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    common = ["--smoke", "--no-progress", "--threads", "1"]
    assert main(["--out", str(first), "--max-steps", "8", *common]) == 0
    a_meta = json.loads((first / "adapter.json").read_text())
    argv = ["--out", str(second), "--max-steps", "10", "--init-adapter", str(first / "adapter.safetensors")]
    assert main([*argv, "--keep", "last", "--certainty-weight", "1.0", *common]) == 0
    history = json.loads((second / "history.json").read_text())
    start = next(h["eval"] for h in history if "eval" in h)
    assert start["step"] == 0
    for k in ("acc@0.25", "acc@0.5", "acc@1"):  # it started where the first run's shipped adapter was
        assert start[k] == a_meta["heldout_best"][k]
    meta = json.loads((second / "adapter.json").read_text())
    assert meta["training"]["kept"] == "last" and "certainty" in meta["training"]["objective"]
    assert meta["init_adapter"].endswith("adapter.safetensors")
    assert any("cert" in h for h in history if "loss" in h)
    with pytest.raises(SystemExit, match="no such adapter file"):
        main(["--out", str(tmp_path / "c"), "--init-adapter", str(tmp_path / "missing.safetensors"), *common])


def test_batched_distillation_answers_like_one_stream(tmp_path, smol_tokenizer, llama_cpp_safe):
    """`distill(streams=3)` (the batched llama.cpp engine) writes the same records as one stream: the same prompts
    and chat ids, greedy answers that agree (up to the batched kernels' rounding, so their first tokens), and
    it resumes (nothing left to write the second time)."""
    from planners.adapt.data import distill, load_examples, make_prompts
    from planners.assets import smollm2_gguf_path

    prompts = make_prompts(0)["heldout"][:3]
    kw = dict(gguf_path=smollm2_gguf_path(), tokenizer=smol_tokenizer, max_new_tokens=16, n_threads=1, progress=False)
    assert distill(prompts, tmp_path / "one.jsonl", **kw) == 3
    assert distill(prompts, tmp_path / "batched.jsonl", streams=3, **kw) == 3
    assert distill(prompts, tmp_path / "batched.jsonl", streams=3, **kw) == 0
    one = {r["text"]: r for r in load_examples(tmp_path / "one.jsonl")}
    batched = {r["text"]: r for r in load_examples(tmp_path / "batched.jsonl")}
    assert set(one) == set(batched) == {p.text for p in prompts}
    eos = smol_tokenizer.eos_token_id
    for text, r in batched.items():
        assert r["prompt_ids"] == one[text]["prompt_ids"] and r["kind"] == one[text]["kind"]
        assert r["response_ids"][:4] == one[text]["response_ids"][:4]
        assert r["finished"] == (r["response_ids"][-1] == eos)
        assert len(r["response_ids"]) <= 16 + 1
