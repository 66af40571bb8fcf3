"""planners.adapt on a tiny random Llama-layout model: the two-copy mask, the loss going down, resume, adapter I/O."""

from __future__ import annotations

import json

import torch

from planners.adapt.cli import LORA_TARGETS, export_adapter, main, synthetic_rows, tiny_base
from planners.adapt.evaluate import heldout_loss
from planners.adapt.objective import CLEAN, NOISY, PROMPT, layout, make_batch, pad_response
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
