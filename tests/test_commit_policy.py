"""The learned commit policy (planners.commit_policy, commit="learned") and the merged-LoRA load path.

Real models only: a tiny random block-causal backbone (the adapted-SmolLM2 layout) run through the real
sampler, and the policy weights shipped in planners/weights/.
"""

from __future__ import annotations

import json

import pytest
import torch

from kernels.sampling_stats import TokenStats
from planners.commit_policy import DEFAULT_COMMIT_POLICY, FEATURES, CommitPolicy, features, load_commit_policy
from planners.loading import load_backbone, merge_lora, save_adapter, save_checkpoint
from planners.model import BackboneConfig, DiffusionBackbone
from planners.sampler import SamplerConfig, sample
from planners.strategies import COMMITS, CommitInputs, commit_learned

V, MASK, EOS = 64, 63, 1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(lora: bool = False, seed: int = 0) -> DiffusionBackbone:
    torch.manual_seed(seed)
    cfg = BackboneConfig(
        arch="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, mask_token_id=MASK, eos_token_id=EOS, shift=True, attention="block_causal",
        block_size=4, learned_mask_embedding=True,
    )  # fmt: skip
    m = DiffusionBackbone(cfg)
    with torch.no_grad():
        m.lm_head.weight.mul_(4.0)
        m.mask_embedding.normal_()
    if lora:
        m.add_lora(4, 8.0, ("q", "k", "v", "o", "gate", "up", "down"))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_b" in n:
                    p.normal_(std=0.2)  # a trained adapter: B is no longer zero
    return m.eval()


PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [20]]


def _cfg(**kw) -> SamplerConfig:
    base = dict(gen_length=12, steps=12, block_length=4, cache="prefix")
    return SamplerConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- merged LoRA


def test_merge_lora_same_logits_and_tokens(tmp_path):
    model = _tiny(lora=True)
    d = save_checkpoint(model, tmp_path / "base")
    save_adapter(model, tmp_path / "adapter.safetensors")
    extra = dict(mask_token_id=MASK)
    unmerged = load_backbone(d, adapter=tmp_path / "adapter.safetensors", **extra)
    merged = load_backbone(d, adapter=tmp_path / "adapter.safetensors", merge_adapter=True, **extra)
    assert not any(".lora_" in k for k in merged.state_dict()) and merged.config.lora_rank == 0
    ids = torch.tensor([[5, 6, 7, MASK, MASK, MASK, MASK]])
    torch.testing.assert_close(merged(ids), unmerged(ids), atol=1e-5, rtol=1e-5)
    for commit in ("static", "threshold"):
        a, b = sample(unmerged, PROMPTS, _cfg(commit=commit)), sample(merged, PROMPTS, _cfg(commit=commit))
        assert torch.equal(a.tokens, b.tokens) and a.nfe == b.nfe
    with pytest.raises(RuntimeError, match="merged"):
        merged.set_adapter_enabled(False)


def test_merge_lora_drops_a_disabled_adapter():
    model = _tiny(lora=True)
    model.set_adapter_enabled(False)
    ids = torch.tensor([[5, 6, 7, MASK, MASK]])
    off = model(ids)
    torch.testing.assert_close(merge_lora(model)(ids), off)


# ----------------------------------------------------------------------------- the rule


def _inputs(prob, token, masked, context, policy=None, threshold=0.5, stop=(EOS,)):
    prob, masked = torch.tensor(prob), torch.tensor(masked)
    token, context = torch.tensor(token), torch.tensor(context)
    st = TokenStats(token, prob, -(prob * prob.log()), prob * 0.5)
    score = torch.where(masked, prob, float("-inf"))
    return CommitInputs(
        score, prob, st.entropy, masked, None, threshold, 0.1, stats=st, context=context, step=1, block=0,
        num_blocks=3, stop_ids=torch.tensor(stop), policy=policy,
    )  # fmt: skip


def test_learned_rule_top1_threshold_and_end_of_answer():
    never = lambda c: torch.zeros(c.masked.shape)  # noqa: E731
    always = lambda c: torch.ones(c.masked.shape)  # noqa: E731
    c = _inputs([[0.3, 0.9, 0.2, 0.4]], [[7, 8, 9, 10]], [[True, True, True, False]], [[4, MASK, MASK, MASK, 11]])
    assert commit_learned(_replace(c, policy=never)).tolist() == [[False, True, False, False]]  # top-1 only
    assert commit_learned(_replace(c, policy=always)).tolist() == [[True, True, True, False]]  # masked only
    # a stop id committed at offset 1: the masked positions right of it are committed too (the answer ends there)
    e = _inputs([[0.3, 0.95, 0.2, 0.1]], [[7, EOS, 9, 10]], [[True, True, True, True]], [[4, MASK, MASK, MASK, MASK]])
    assert commit_learned(_replace(e, policy=never)).tolist() == [[False, True, True, True]]
    with pytest.raises(ValueError, match="commit policy"):
        commit_learned(_replace(c, policy=None))


def _replace(c: CommitInputs, **kw) -> CommitInputs:
    import dataclasses

    return dataclasses.replace(c, **kw)


def test_features_are_deterministic_and_named():
    c = _inputs([[0.3, 0.9, 0.2, 0.4]], [[7, 7, EOS, 10]], [[True, True, True, False]], [[7, MASK, MASK, MASK, 11]])
    f = features(c)
    assert f.shape == (1, 4, len(FEATURES)) and f.dtype == torch.float32
    assert torch.equal(f, features(c))
    col = {n: f[0, :, i].tolist() for i, n in enumerate(FEATURES)}
    assert col["leftmost"] == [1.0, 0.0, 0.0, 0.0]
    assert col["same_as_left"] == [1.0, 1.0, 0.0, 0.0]  # 7 after the block's left neighbour 7; 7 after 7
    assert col["is_stop"] == [0.0, 0.0, 1.0, 0.0]
    assert col["right_conf"] == pytest.approx([0.9, 0.2, 1.0, 0.0])  # offset 3 is committed: 1; past the end: 0
    policy = load_commit_policy()
    assert torch.equal(policy(c), policy(c))


# ----------------------------------------------------------------------------- loading and selection


def test_shipped_policy_loads_with_metadata():
    policy = load_commit_policy()
    meta = json.loads(DEFAULT_COMMIT_POLICY.with_suffix(".json").read_text())
    assert meta["features"] == list(FEATURES) and policy.meta["features"] == list(FEATURES)
    n = sum(p.numel() for p in policy.parameters())
    assert n == meta["parameters"] and n < 10_000  # "a few thousand parameters"
    assert {"training_set", "heldout_metrics"} <= set(meta)
    assert load_commit_policy() is policy  # cached


def test_learned_commit_runs_through_the_sampler():
    assert "learned" in COMMITS
    model = _tiny()
    static = sample(model, PROMPTS, _cfg())
    out = sample(model, PROMPTS, _cfg(commit="learned", threshold=0.5))
    assert not bool((out.tokens == MASK).any())
    assert out.nfe <= static.nfe and int(out.tokens_per_step.sum()) == 12 * len(PROMPTS)
    again = sample(model, PROMPTS, _cfg(commit="learned", threshold=0.5))
    assert torch.equal(out.tokens, again.tokens)


def test_learned_commit_with_a_policy_path(tmp_path):
    torch.manual_seed(1)
    p = CommitPolicy(len(FEATURES), 8)
    with torch.no_grad():
        p.net[-1].bias.fill_(-50.0)  # never fires: one token per pass, top-1 by confidence
    p.save(tmp_path / "never.safetensors", {"note": "test"})
    model = _tiny(seed=3)
    out = sample(model, [[5, 6, 7]], _cfg(commit="learned", commit_policy=str(tmp_path / "never.safetensors")))
    per_step = out.tokens_per_step[:, 0].tolist()
    assert all(n == 1 for n in per_step[: per_step.index(max(per_step))])  # one per pass until any end-of-answer


def test_bad_policy_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="commit policy weights not found: .*nope.safetensors"):
        SamplerConfig(commit="learned", commit_policy=str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        SamplerConfig(commit="learned", commit_policy=str(bad))
    other = tmp_path / "other.safetensors"
    CommitPolicy(len(FEATURES), 8).save(other, {})
    other.with_suffix(".json").write_text(json.dumps({"features": ["prob", "margin"], "hidden": 8}))
    with pytest.raises(ValueError, match="trained on features"):
        SamplerConfig(commit="learned", commit_policy=str(other))


def test_config_selects_learned_by_name(tmp_path):
    from hybrid.config import HybridConfig
    from hybrid.runtime import sampler_config

    cfg = HybridConfig(planner={"commit": "learned", "threshold": 0.7})
    sc = sampler_config(cfg)
    assert sc.commit == "learned" and sc.threshold == 0.7 and sc.commit_policy is None
    path = tmp_path / "p.safetensors"
    CommitPolicy(len(FEATURES), 8).save(path, {})
    assert sampler_config(HybridConfig(planner={"commit": "learned", "commit_policy": str(path)})).commit_policy == str(
        path
    )
    with pytest.raises(Exception, match="planner.commit_policy"):
        HybridConfig(planner={"commit": "learned", "commit_policy": str(tmp_path / "missing.safetensors")})
