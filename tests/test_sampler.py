"""The denoising sampler: strategies, EOS handling, infilling, trajectories, CFG, batching and KV caching.

Models are tiny and real: random checkpoints of the three layouts (LLaDA full attention; Dream full attention
with the shift; Llama adapted with block-causal or causal attention and the shift), saved and loaded through
`save_checkpoint` / `load_backbone`, plus one LLaDA-layout model trained here for a few seconds on a copy
task (copy the first L of 4 prompt tokens, then EOS), which is confident the way a trained planner is.
The fidelity against the LLaDA / Dream reference procedures, Fast-dLLM's factor rule and dInfer's credit decoding
is in test_sampler_fidelity.py; the newer rules' behaviour (factor, credit, adaptive blocks, the end-of-text stop
inside a block, thresholds in the confidence's units) is at the end of this file.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from planners.loading import load_backbone, save_checkpoint
from planners.model import BackboneConfig, DiffusionBackbone
from planners.sampler import SamplerConfig, denoise, infill, sample
from planners.strategies import (
    CACHES,
    COMMITS,
    CONFIDENCES,
    PRECISIONS,
    REMASKS,
    SCHEDULES,
    CommitInputs,
    TokenStats,
    block_end_adaptive,
    commit_factor,
    credit_boost,
    dilated_order,
    stop_inside,
)

V, MASK, EOS, EOT = 64, 63, 1, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread. On a shared 2-core machine, two OpenMP threads spinning against other
    jobs made each 8-step run ~200x slower (6 s instead of 0.03 s, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random(tmp_path_factory, arch: str, *, attention: str = "full", block_size: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    shift = arch != "llada"
    cfg = BackboneConfig(
        arch=arch,
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mask_token_id=MASK,
        eos_token_id=EOS,
        qkv_bias=arch == "dream",
        shift=shift,
        attention=attention,
        block_size=block_size,
    )
    model = DiffusionBackbone(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # peakier than the default init, as a trained model
    d = save_checkpoint(model, tmp_path_factory.mktemp(f"{arch}-{attention}"))
    extra = {"attention": attention, "block_size": block_size, "mask_token_id": MASK} if arch == "llama" else {}
    loaded = load_backbone(d, **extra)
    if arch == "llama":  # the learned mask embedding starts at the mean embedding: give it its own direction
        with torch.no_grad():
            loaded.mask_embedding.copy_(torch.randn(32, generator=torch.Generator().manual_seed(seed)))
    return loaded


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    return _random(tmp_path_factory, "llada")


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    return _random(tmp_path_factory, "dream", seed=1)


@pytest.fixture(scope="module")
def block_causal(tmp_path_factory):
    return _random(tmp_path_factory, "llama", attention="block_causal", block_size=4, seed=2)


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    return _random(tmp_path_factory, "llama", attention="causal", seed=3)


# ----------------------------------------------------------------------------- the copy model

CV, CMASK, SEP, P, G = 32, 31, 2, 6, 12  # prompt: c1 c2 c3 c4 LEN SEP; answer: c1..cL then EOS (span 12)


def _copy_batch(n: int, g: torch.Generator):
    c = torch.randint(4, 24, (n, 4), generator=g)
    n_copy = torch.randint(1, 5, (n,), generator=g)
    prompt = torch.cat([c, (24 + n_copy)[:, None], torch.full((n, 1), SEP)], 1)
    j = torch.arange(G)
    ans = torch.where(j[None] < n_copy[:, None], F.pad(c, (0, G - 4)), EOS)
    return prompt, ans


@pytest.fixture(scope="module")
def copier(tmp_path_factory, _one_thread):
    """An LLaDA-layout model trained by the masked-diffusion loss for 200 steps (a few seconds, one thread)."""
    torch.manual_seed(0)
    cfg = BackboneConfig(
        arch="llada", vocab_size=CV, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=4, mask_token_id=CMASK, eos_token_id=EOS,
    )  # fmt: skip
    model = DiffusionBackbone(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        prompt, ans = _copy_batch(32, g)
        masked = torch.rand(32, G, generator=g) < torch.rand(32, 1, generator=g).clamp(min=0.05)
        logits = model(torch.cat([prompt, torch.where(masked, CMASK, ans)], 1))[:, P:]
        loss = F.cross_entropy(logits[masked], ans[masked])
        opt.zero_grad()
        loss.backward()
        opt.step()
    d = save_checkpoint(model, tmp_path_factory.mktemp("copier"))
    return load_backbone(d)


@pytest.fixture(scope="module")
def copy_prompts():
    prompt, ans = _copy_batch(6, torch.Generator().manual_seed(123))
    return prompt.tolist(), ans


def _masks(model, prompt, n):
    return torch.cat([torch.as_tensor(prompt)[None], torch.full((1, n), model.config.mask_token_id)], 1)


# ----------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "field", ["confidence", "commit", "schedule", "remask", "cache", "precision", "eos_early_stop"]
)
def test_unknown_strategy_names_fail_at_config_time_listing_valid_ones(field):
    with pytest.raises(ValueError) as e:
        SamplerConfig(**{field: "nope"})
    msg = str(e.value)
    assert field in msg and "nope" in msg and "valid" in msg
    valid = {"confidence": CONFIDENCES, "commit": COMMITS, "cache": CACHES, "remask": REMASKS}.get(field, {})
    assert all(name in msg for name in valid)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(gen_length=30, block_length=8), "multiple of block_length"),
        (dict(gen_length=32, block_length=8, steps=10), "multiple of the number of blocks"),
        (dict(gen_length=32, block_length=8, steps=2, commit="threshold"), "fewer than the 4 blocks"),
        (dict(gen_length=0), "gen_length"),
        (dict(temperature=-1.0), "temperature"),
        (dict(threshold=1.5, commit="threshold"), "threshold"),
        (dict(block_length=256, gen_length=128), "exceeds"),
    ],
)
def test_invalid_settings_are_named(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SamplerConfig(**kwargs)


def test_dynamic_commits_do_not_need_divisible_steps():
    SamplerConfig(gen_length=32, block_length=8, steps=10, commit="threshold")  # no error: steps is a budget


def test_block_causal_model_needs_matching_block_length(block_causal):
    with pytest.raises(ValueError, match="block_size=4"):
        sample(block_causal, [[5, 6]], SamplerConfig(gen_length=16, steps=16, block_length=8))


def test_block_length_none_survives_replace():
    import dataclasses

    cfg = dataclasses.replace(SamplerConfig(gen_length=64, steps=64), gen_length=16, steps=16)
    assert cfg.block == 16 and cfg.num_blocks == 1


# ----------------------------------------------------------------------------- every strategy runs


def _no_masks_left(out, mask_id):
    return not (out.sequences == mask_id).any()


@pytest.mark.parametrize(
    "override",
    [{"confidence": c} for c in CONFIDENCES]
    + [{"commit": c} for c in COMMITS]
    + [{"schedule": s} for s in SCHEDULES]
    + [{"cache": c} for c in CACHES]
    + [{"remask": r, "remask_threshold": 1.0} for r in REMASKS]
    + [{"precision": p} for p in PRECISIONS]
    + [{"eos_early_stop": e} for e in ("off", "all", "any", "inside")]
    + [{"commit": "threshold", "boost": "credit"}, {"commit": "threshold", "blocks": "adaptive", "delimiter_ids": (9,)}]
    + [{"position_calibration": 2.0}, {"cfg_scale": 1.0}, {"temperature": 0.7, "seed": 3}],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
@pytest.mark.parametrize("which", ["llada", "dream", "block_causal"])
def test_every_registry_name_runs(request, which, override):
    model = request.getfixturevalue(which)
    cfg = SamplerConfig(gen_length=16, steps=8, block_length=4, record_trajectory=True, **override)
    out = sample(model, [[5, 6, 7], [8, 9, 10, 11, 12]], cfg)
    assert out.tokens.shape == (2, 16) and _no_masks_left(out, MASK)
    assert 1 <= out.steps <= 8 and out.nfe == out.steps * (2 if cfg.cfg_scale else 1)
    assert len(out.step_seconds) == out.steps and out.tokens_per_step.shape == (out.steps, 2)
    assert len(out.trajectories) == 2 and all(len(t) == out.steps for t in out.trajectories)


# ----------------------------------------------------------------------------- commit rules on a confident model


def test_copy_model_learned_the_task(copier, copy_prompts):
    prompts, ans = copy_prompts
    out = sample(copier, prompts, SamplerConfig(gen_length=G, steps=G, block_length=4))
    assert out.tokens.tolist() == ans.tolist()


@pytest.mark.parametrize(
    "fast", [dict(commit="threshold", threshold=0.9), dict(commit="entropy_bounded", eb_gamma=0.5)]
)
def test_dynamic_commits_take_fewer_steps_than_static_on_a_confident_model(copier, copy_prompts, fast):
    prompts, ans = copy_prompts
    base = dict(gen_length=G, steps=G, block_length=4, eos_early_stop="off")
    static = sample(copier, prompts, SamplerConfig(**base))
    dynamic = sample(copier, prompts, SamplerConfig(**base, **fast))
    assert static.steps == G  # one token per step, by construction
    assert dynamic.steps < static.steps / 2, (dynamic.steps, dynamic.tokens_per_step.sum(1).tolist())
    assert dynamic.tokens.tolist() == ans.tolist() == static.tokens.tolist()
    assert int(dynamic.tokens_per_step.sum()) == int(static.tokens_per_step.sum()) == len(prompts) * G


def test_position_calibration_orders_commits(llada):
    for strength, order in [(100.0, sorted), (-100.0, lambda p: sorted(p, reverse=True))]:
        cfg = SamplerConfig(gen_length=8, steps=8, position_calibration=strength, record_trajectory=True)
        traj = sample(llada, [[5, 6, 7]], cfg).trajectories[0]
        seq = [s.committed[0] for s in traj.steps]
        assert seq == order(seq) == order(list(range(8)))


def test_dilated_commits_spread_out_positions(llada):
    cfg = SamplerConfig(gen_length=16, steps=16, block_length=8, commit="dilated", record_trajectory=True)
    traj = sample(llada, [[5, 6, 7]], cfg).trajectories[0]
    assert [s.committed for s in traj.steps[:8]] == [[0], [4], [2], [6], [1], [5], [3], [7]]
    assert [s.committed[0] - 8 for s in traj.steps[8:]] == dilated_order(8, "cpu").argsort().tolist()
    two = SamplerConfig(gen_length=8, steps=4, commit="dilated", record_trajectory=True)
    first = sample(llada, [[5, 6, 7]], two).trajectories[0].steps[0].committed
    assert first == [0, 4]  # committed together: as far apart as the block allows


def test_entropy_bound_controls_tokens_per_step(llada):
    tight = sample(llada, [[5, 6, 7]], SamplerConfig(gen_length=8, steps=8, commit="entropy_bounded", eb_gamma=1e-6))
    loose = sample(llada, [[5, 6, 7]], SamplerConfig(gen_length=8, steps=8, commit="entropy_bounded", eb_gamma=1e6))
    assert tight.steps == 8 and tight.tokens_per_step.flatten().tolist() == [1] * 8
    assert loose.steps == 1 and loose.tokens_per_step.flatten().tolist() == [8]


def test_remasking_is_bounded_and_finishes(llada):
    cfg = SamplerConfig(
        gen_length=16, steps=16, block_length=8, remask="low_confidence", remask_threshold=1.0,
        remask_fraction=0.25, record_trajectory=True,
    )  # fmt: skip
    out = sample(llada, [[5, 6, 7], [9, 10]], cfg)
    assert _no_masks_left(out, MASK) and out.steps == 16
    for traj in out.trajectories:
        remasked = [p for s in traj.steps for p in s.remasked]
        assert remasked, "a remask threshold of 1.0 must remask something"
        assert len(remasked) == len(set(remasked))  # each position at most once
        assert all(len(s.remasked) <= 2 for s in traj.steps)  # 0.25 of a block of 8 per step
        assert traj.steps[-1].masked_after == 0


# ----------------------------------------------------------------------------- EOS


def test_answers_stop_at_the_first_stop_id_and_finished_blocks_stop_early(copier, copy_prompts):
    prompts, ans = copy_prompts
    n_copy = [p[4] - 24 for p in prompts]
    off = sample(copier, prompts, SamplerConfig(gen_length=G, steps=G, block_length=4, eos_early_stop="off"))
    stop = sample(copier, prompts, SamplerConfig(gen_length=G, steps=G, block_length=4, eos_early_stop="all"))
    assert off.lengths == stop.lengths == n_copy
    assert stop.answers() == [a[:n].tolist() for a, n in zip(ans, n_copy, strict=True)]
    assert stop.tokens.tolist() == off.tokens.tolist()  # the early-stop fill is what the model writes anyway
    # every answer is <= 4 tokens: block 2 is all EOS, so block 3 is filled without a forward pass
    assert off.steps == 12 and stop.steps == 8
    anyeos = sample(copier, prompts, SamplerConfig(gen_length=G, steps=G, block_length=4, eos_early_stop="any"))
    assert anyeos.answers() == stop.answers() and anyeos.steps <= stop.steps


def test_early_stop_fill_is_recorded_in_the_trajectory(copier, copy_prompts):
    prompts, _ = copy_prompts
    cfg = SamplerConfig(gen_length=G, steps=G, block_length=4, record_trajectory=True)
    out = sample(copier, prompts, cfg)
    assert out.steps == 8
    for traj in out.trajectories:
        committed = [p for s in traj.steps for p in s.committed]
        assert sorted(committed) == list(range(G))  # the EOS fill of block 3 joins the last step's commits
        last = traj.steps[-1]
        assert last.masked_after == 0 and set(range(8, G)) <= set(last.committed)
        assert all(c == 1.0 for p, c in zip(last.committed, last.confidences, strict=True) if p >= 8)


def test_extra_stop_ids_end_the_answer(llada):
    """Any of config.stop_ids ends the answer: here a fixed end-of-turn id inside the span."""
    import dataclasses

    x = _masks(llada, [5, 6, 7], 8)
    x[0, 3 + 2] = EOT
    cfg = SamplerConfig(gen_length=8, steps=8, eos_early_stop="off")
    old = llada.config
    try:
        llada.config = dataclasses.replace(old, extra_eos_ids=(EOT,))
        out = denoise(llada, x, gen_start=3, config=cfg)
    finally:
        llada.config = old
    first_eos = [i for i, t in enumerate(out.tokens[0].tolist()) if t in (EOS, EOT)][0]
    assert out.lengths == [first_eos] and first_eos <= 2
    assert out.answers() == [out.tokens[0, :first_eos].tolist()]


# ----------------------------------------------------------------------------- infilling


def test_infill_keeps_fixed_tokens_of_a_json_skeleton(llada):
    """A JSON skeleton with masked slots: the structure is fixed tokens, the model fills the slots only, so the
    result always parses (toy detokenizer: fixed ids -> their JSON text, filled slots -> words)."""
    text = {40: "{", 41: "}", 42: '"name"', 43: ":", 44: ",", 45: '"steps"', 46: "[", 47: "]", 48: '"'}
    ids = {v: k for k, v in text.items()}
    skeleton = ["{", '"name"', ":", '"', None, None, '"', ",", '"steps"', ":", "[", '"', None, '"', ",", '"', None, '"',
                "]", "}"]  # fmt: skip
    template = [MASK if t is None else ids[t] for t in skeleton]
    out = infill(llada, template, SamplerConfig(gen_length=99, steps=5), prompts=[[5, 6, 7, 8]])
    got = out.tokens[0].tolist()
    assert len(got) == len(template) and out.steps == 5
    assert all(g == t for g, t in zip(got, template, strict=True) if t != MASK)
    assert all(g != MASK for g in got)
    rendered = "".join(f"w{g} " if t == MASK else text[t] for g, t in zip(got, template, strict=True))
    doc = json.loads(rendered)
    assert set(doc) == {"name", "steps"} and len(doc["steps"]) == 2


def test_infill_with_a_trained_model_fills_between_fixed_tokens(copier, copy_prompts):
    prompts, ans = copy_prompts
    row = next(i for i, p in enumerate(prompts) if p[4] - 24 == 4)  # an answer of 4 copied tokens
    template = [CMASK, ans[row, 1].item(), CMASK, CMASK] + [EOS] * (G - 4)  # the span length it was trained on
    out = infill(copier, template, SamplerConfig(gen_length=G, steps=3), prompts=[prompts[row]])
    assert out.tokens[0].tolist() == ans[row].tolist() and out.steps == 3


def test_masked_slots_in_the_prompt_are_filled(copier, copy_prompts):
    prompts, _ = copy_prompts
    prompt = list(prompts[0])
    prompt[1] = CMASK
    out = sample(copier, [prompt], SamplerConfig(gen_length=G, steps=G, block_length=4))
    seq = out.sequences[0].tolist()
    assert CMASK not in seq and seq[0] == prompt[0] and seq[2:P] == prompt[2:]


def test_templates_of_different_lengths_are_padded_with_eos(llada):
    out = infill(llada, [[MASK, 9, MASK], [MASK] * 5], SamplerConfig(gen_length=8, steps=5), prompts=[[5], [6, 7]])
    assert out.tokens.shape == (2, 5) and out.tokens[0, 3:].tolist() == [EOS, EOS] and out.tokens[0, 1] == 9


def test_denoise_does_not_modify_its_input(llada):
    x = _masks(llada, [5, 6, 7], 8)
    before = x.clone()
    denoise(llada, x, gen_start=3, config=SamplerConfig(gen_length=8, steps=4))
    assert torch.equal(x, before)


def test_shifted_models_need_a_prompt(dream):
    with pytest.raises(ValueError, match="non-empty"):
        sample(dream, [[5, 6], []], SamplerConfig(gen_length=8, steps=8))


# ----------------------------------------------------------------------------- trajectories


@pytest.mark.parametrize("which", ["llada", "dream"])
def test_trajectory_x0_hat_is_where_masked_argmax_else_x(request, which):
    model = request.getfixturevalue(which)
    shift = int(model.config.shift)
    prompt = [5, 6, 7, 8]
    cfg = SamplerConfig(gen_length=12, steps=6, block_length=6, record_trajectory=True)
    out = sample(model, [prompt], cfg)
    traj = out.trajectories[0]
    assert len(traj) == out.steps == out.nfe == traj.nfe == 6
    x = _masks(model, prompt, 12)
    gs = len(prompt)
    initially_masked = set(range(12))
    seen: list[int] = []
    for step in traj.steps:
        with torch.no_grad():
            logits = model(x)[0].float()
        logits[:, MASK] = float("-inf")
        if shift:
            logits = torch.cat([logits[:1], logits[:-1]])
        argmax = logits.argmax(-1)[gs:]
        span = x[0, gs:]
        assert step.x0_hat == torch.where(span == MASK, argmax, span).tolist()
        probs = torch.softmax(logits, -1)[gs:]
        want = [probs[p, step.x0_hat[p]].item() for p in step.committed]
        assert step.confidences == pytest.approx(want, abs=1e-5)
        ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1)[span == MASK].mean().item()
        assert step.mean_entropy == pytest.approx(ent, rel=1e-4)
        for p in step.committed:  # temperature 0: the committed token is the argmax
            x[0, gs + p] = step.x0_hat[p]
        seen += step.committed
        assert step.masked_after == int((x[0, gs:] == MASK).sum())
    assert sorted(seen) == sorted(initially_masked) and len(seen) == len(set(seen))  # a partition of the span
    assert traj.final == out.tokens[0].tolist() == x[0, gs:].tolist()
    assert traj.prompt_length == gs and traj.meta["sampler"]["steps"] == 6
    assert traj.to_dict()["steps"][0]["x0_hat"] == traj.steps[0].x0_hat


def test_no_trajectory_unless_asked(llada):
    assert sample(llada, [[5, 6]], SamplerConfig(gen_length=8, steps=4)).trajectories is None


# ----------------------------------------------------------------------------- CFG and noise


def test_cfg_doubles_nfe_and_changes_the_logits(llada):
    plain = sample(llada, [[5, 6, 7]], SamplerConfig(gen_length=16, steps=8, block_length=8))
    guided = sample(llada, [[5, 6, 7]], SamplerConfig(gen_length=16, steps=8, block_length=8, cfg_scale=3.0))
    assert plain.nfe == 8 and guided.nfe == 16 and guided.steps == 8
    assert plain.tokens.tolist() != guided.tokens.tolist()


def test_seeded_sampling_is_reproducible(llada):
    cfg = SamplerConfig(gen_length=16, steps=8, temperature=1.0, seed=7)
    a, b = sample(llada, [[5, 6, 7]], cfg), sample(llada, [[5, 6, 7]], cfg)
    c = sample(llada, [[5, 6, 7]], SamplerConfig(gen_length=16, steps=8, temperature=1.0, seed=8))
    assert a.tokens.tolist() == b.tokens.tolist() != c.tokens.tolist()


# ----------------------------------------------------------------------------- batching


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]


@pytest.mark.parametrize(
    "which,override",
    [
        ("llada", dict(cache="none")),
        ("llada", dict(cache="dual", commit="threshold", threshold=0.2)),
        ("llada", dict(cache="prefix", cfg_scale=1.0)),
        ("dream", dict(cache="none", confidence="entropy", schedule="dream")),
        ("dream", dict(cache="dual", confidence="margin")),
        ("block_causal", dict(cache="prefix")),
        ("causal", dict(cache="dual", commit="entropy_bounded", eb_gamma=2.0)),
    ],
)
def test_a_batch_of_different_prompt_lengths_matches_each_prompt_alone(request, which, override):
    model = request.getfixturevalue(which)
    cfg = SamplerConfig(gen_length=16, steps=8, block_length=4, **override)
    batched = sample(model, PROMPTS, cfg)
    for i, p in enumerate(PROMPTS):
        alone = sample(model, [p], cfg)
        assert batched.tokens[i].tolist() == alone.tokens[0].tolist(), f"prompt {i}"
        assert batched.lengths[i] == alone.lengths[0]


# ----------------------------------------------------------------------------- KV caching


@pytest.mark.parametrize("which", ["block_causal", "causal"])
@pytest.mark.parametrize("commit", ["static", "threshold"])
def test_caches_are_exact_for_block_causal_and_causal_attention(request, which, commit):
    """Later blocks are invisible to earlier positions, so cached K/V of finished blocks are final: the prefix
    and dual caches must give the very tokens of the no-cache run."""
    model = request.getfixturevalue(which)
    runs = {}
    for cache in CACHES:
        cfg = SamplerConfig(gen_length=16, steps=8, block_length=4, commit=commit, threshold=0.3, cache=cache)
        runs[cache] = sample(model, PROMPTS, cfg)
    assert runs["prefix"].tokens.tolist() == runs["none"].tokens.tolist() == runs["dual"].tokens.tolist()
    assert runs["prefix"].nfe == runs["none"].nfe


def test_caches_are_exact_for_full_attention_with_one_step_per_block(llada):
    """Every block starts with a full forward (the refresh): with one step per block nothing is stale."""
    base = dict(gen_length=16, steps=4, block_length=4)
    ref = sample(llada, PROMPTS, SamplerConfig(**base)).tokens.tolist()
    for cache in ("prefix", "dual"):
        assert sample(llada, PROMPTS, SamplerConfig(**base, cache=cache)).tokens.tolist() == ref


def test_cache_drift_on_full_attention_is_measured(llada, copier, copy_prompts):
    """Full attention: inside a block the cached K/V of other positions are stale (prefix: everything before the
    block; dual: before and after it), so tokens may differ from the no-cache run. Measured, not assumed:
    tiny random LLaDA-layout model, 3 prompts x 32 tokens, blocks of 8, 4 steps per block: 85.4% (prefix) and
    87.5% (dual) of the tokens agree with the no-cache run; the trained copy model agrees on every token. The
    bounds below pin those figures (a random model has no structure for stale K/V to preserve; a trained one
    changes little within a block, which is what Fast-dLLM relies on)."""
    base = dict(gen_length=32, steps=16, block_length=8)
    ref = sample(llada, PROMPTS, SamplerConfig(**base)).tokens
    agree = {}
    for cache in ("prefix", "dual"):
        got = sample(llada, PROMPTS, SamplerConfig(**base, cache=cache)).tokens
        agree[cache] = (got == ref).float().mean().item()
    prompts, ans = copy_prompts
    cfg = dict(gen_length=G, steps=6, block_length=4)
    copy_agree = {c: sample(copier, prompts, SamplerConfig(**cfg, cache=c)).tokens.tolist() == ans.tolist()
                  for c in CACHES}  # fmt: skip
    print(f"\ntoken agreement with the no-cache run, random model: {agree}; copy model exact: {copy_agree}")
    assert all(copy_agree.values())
    assert all(0.8 <= a < 1.0 for a in agree.values()), agree  # approximate: some drift, and bounded


def test_cached_window_logits_drift_is_small_but_real(llada):
    """The approximation at its source: logits of the block computed over a stale prefix cache vs a fresh
    full forward, after one step's commits: measured 0.12 on logits of std ~2; not zero, and small."""
    from planners.model import KVCache

    torch.manual_seed(0)
    x = _masks(llada, [5, 6, 7, 8], 16)
    gs, lo = 4, 12  # the second block of 8 starts at 12
    x[0, gs:lo] = torch.randint(3, 60, (8,))
    cache = KVCache.allocate(llada.config, 1, x.shape[1], dtype=torch.float32, device="cpu")
    with torch.no_grad():
        llada(x, cache=cache, cache_start=0)  # refresh: K/V from the block start
        x[0, lo : lo + 3] = torch.tensor([9, 10, 11])  # this step's commits
        cached = llada(x[:, lo:], cache=cache, cache_start=lo)  # prefix cache: [lo, L) recomputed
        fresh = llada(x)[:, lo:]
    diff = (cached - fresh).abs().max().item()
    print(f"\nmax |logit difference| prefix cache vs full forward: {diff:.3g}")
    assert 0 < diff < 0.5  # measured 0.12 (logits of std ~2)


def test_bfloat16_model_with_dual_cache(copier, copy_prompts):
    prompts, ans = copy_prompts
    model = DiffusionBackbone(copier.config)
    model.load_state_dict(copier.state_dict())
    model = model.to(torch.bfloat16).eval()
    out = sample(model, prompts, SamplerConfig(gen_length=G, steps=G, block_length=4, cache="dual"))
    assert out.tokens.tolist() == ans.tolist()


# ----------------------------------------------------------------------------- host syncs (GPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_per_step_on_cuda(copier):
    """Static commits: the host reads once per block (is there anything to fill?) and at the start and end,
    never per step. Counted with CUDA's sync debug mode: the count must not grow with the number of steps."""
    import warnings

    model = DiffusionBackbone(copier.config)
    model.load_state_dict(copier.state_dict())
    model = model.cuda().eval()
    prompt = [[4, 5, 6, 7, 28, SEP]]

    def syncs(steps: int, **kw) -> int:
        cfg = SamplerConfig(gen_length=G, steps=steps, block_length=4, eos_early_stop="off", **kw)
        sample(model, prompt, cfg)  # warm-up: lazy initialisation may sync once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                sample(model, prompt, cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    for kw in ({}, {"cache": "dual", "temperature": 0.7, "seed": 0}, {"record_trajectory": True}):
        assert syncs(3, **kw) == syncs(12, **kw), kw


RULE_PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]


# ----------------------------------------------------------------------------- factor rule


def test_a_higher_factor_commits_more_per_step_on_the_same_confidences():
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        conf = torch.rand(4, 8, generator=g) ** 0.3
        masked = torch.rand(4, 8, generator=g) < 0.8
        masked[:, 0] = True
        score = torch.where(masked, conf, float("-inf"))
        counts = [
            commit_factor(CommitInputs(score, conf, conf, masked, None, 0.9, 0.1, f)).sum(-1)
            for f in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
        ]
        for lo, hi in zip(counts, counts[1:], strict=False):
            assert (lo <= hi).all()
        assert (counts[0] >= 1).all() and (counts[-1] <= masked.sum(-1)).all()


def test_a_higher_factor_takes_fewer_passes(llada, copier, copy_prompts):
    nfe = {}
    for f in (0.25, 1.0, 4.0):
        cfg = SamplerConfig(gen_length=16, steps=16, block_length=8, commit="factor", factor=f, eos_early_stop="off")
        out = sample(llada, RULE_PROMPTS, cfg)
        assert not (out.tokens == MASK).any()
        nfe[f] = out.nfe
    assert nfe[0.25] >= nfe[1.0] >= nfe[4.0] and nfe[4.0] < nfe[0.25], nfe
    prompts, ans = copy_prompts  # a confident model: the right answer in one pass per block
    cfg = SamplerConfig(gen_length=G, steps=G, block_length=4, commit="factor", factor=1.0, eos_early_stop="off")
    out = sample(copier, prompts, cfg)
    assert out.tokens.tolist() == ans.tolist() and out.nfe == G // 4


# ----------------------------------------------------------------------------- credit decoding


def _logits_top(token: int, v: int = 8, high: float = 4.0) -> torch.Tensor:
    x = torch.zeros(v)
    x[token] = high
    return x


def test_credit_accumulates_only_on_repeated_predictions():
    """Position 0 predicts token 3 twice; position 1 predicts 4 then 6; position 2 is already committed."""
    masked = torch.tensor([[True, True, False]])
    step1 = torch.stack([_logits_top(3), _logits_top(4), _logits_top(5)])[None]
    step2 = torch.stack([_logits_top(3), _logits_top(6), _logits_top(5)])[None]
    p = torch.softmax(step1[0, 0], -1).max().item()
    kw = dict(alpha=0.7, gamma=0.2, decay=0.8)
    out1, credit = credit_boost(step1, masked, None, **kw)
    assert credit[0, 0, 3] == pytest.approx(p**0.2) and credit[0, 2].abs().sum() == 0  # committed: no credit
    out2, credit = credit_boost(step2, masked, credit, **kw)
    assert credit[0, 0, 3] == pytest.approx(0.8 * p**0.2 + p**0.2)  # repeated: decayed credit plus new
    assert credit[0, 1, 4] == pytest.approx(0.8 * p**0.2)  # predicted once: it only decays
    assert credit[0, 1, 6] == pytest.approx(p**0.2)
    assert (credit[0, 0, [0, 1, 2, 4, 5, 6, 7]] == 0).all()  # never top-1 there: never any credit
    boost2 = out2 - step2
    assert boost2[0, 0, 3] > boost2[0, 1, 6] > boost2[0, 1, 4] > 0  # twice > once now > once before
    assert boost2[0, 2].abs().sum() == 0


def test_credit_commits_earlier_on_a_model_that_repeats_itself(llada):
    base = dict(gen_length=16, steps=16, block_length=8, commit="threshold", threshold=0.5, eos_early_stop="off")
    plain = sample(llada, RULE_PROMPTS, SamplerConfig(**base))
    credit = sample(llada, RULE_PROMPTS, SamplerConfig(**base, boost="credit", credit_alpha=2.0))
    assert credit.nfe < plain.nfe
    assert not (credit.tokens == MASK).any()


# ----------------------------------------------------------------------------- adaptive blocks


def _stats(tok, prob):
    tok, prob = torch.tensor(tok), torch.tensor(prob)
    return TokenStats(tok, prob, torch.zeros_like(prob), torch.zeros_like(prob))


def test_adaptive_block_ends_after_the_most_confident_delimiter_else_the_default():
    delims = torch.tensor([9])
    kw = dict(lo=10, default_hi=14, limit=30, window=8, delimiter_ids=delims, threshold=0.5)
    masked = torch.ones(1, 8, dtype=torch.bool)
    # a delimiter at offset 5 with p = 0.9: the block is 6 long (longer than the default 4)
    st = _stats([[1, 2, 3, 4, 5, 9, 6, 9]], [[0.9] * 5 + [0.9, 0.9, 0.6]])
    assert block_end_adaptive(stats=st, masked=masked, **kw) == 16
    # the delimiters are not confident (p < threshold): the default block
    st = _stats([[1, 9, 3, 4, 5, 9, 6, 7]], [[0.9, 0.4, 0.9, 0.9, 0.9, 0.45, 0.9, 0.9]])
    assert block_end_adaptive(stats=st, masked=masked, **kw) == 14
    # the limit (a block-causal planner's training block) bounds it
    st = _stats([[1, 2, 3, 4, 5, 9, 6, 7]], [[0.9] * 8])
    assert block_end_adaptive(stats=st, masked=masked, **{**kw, "limit": 13}) == 13
    # a batch ends at the earliest row's end: no row's block crosses its own boundary
    st = _stats([[9, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 9, 7, 8]], [[0.8] * 8, [0.9] * 8])
    assert block_end_adaptive(stats=st, masked=torch.ones(2, 8, dtype=torch.bool), **kw) == 11


def _block_ends(model, prompts, cfg):
    ends = []
    out = sample(model, prompts, cfg, on_block=lambda d: ends.append(d.final) and None)
    return out, ends


@pytest.mark.parametrize("threshold", [0.05, 0.5, 1.0])
def test_adaptive_blocks_never_cross_a_training_block_of_a_block_causal_planner(block_causal, threshold):
    """block_causal (training blocks of 4): an adaptive block only ends early inside a training block. The
    attention follows the sampler's blocks, so the prefix cache stays exact: cached and uncached runs agree."""
    base = dict(gen_length=16, steps=16, block_length=4, commit="threshold", threshold=0.3, blocks="adaptive",
                delimiter_ids=tuple(range(10, 40)), delimiter_threshold=threshold)  # fmt: skip
    runs = {}
    for cache in ("none", "prefix"):
        out, ends = _block_ends(block_causal, RULE_PROMPTS, SamplerConfig(**base, cache=cache))
        starts = [0, *ends[:-1]]
        assert ends[-1] == 16 and all(b > a for a, b in zip(starts, ends, strict=True))
        assert all(a // 4 == (b - 1) // 4 for a, b in zip(starts, ends, strict=True))  # inside one training block
        runs[cache] = (out.tokens.tolist(), ends)
    assert runs["none"] == runs["prefix"]
    if threshold == 1.0:  # never confident enough: the fixed grid
        assert runs["none"][1] == [4, 8, 12, 16]
    if threshold == 0.05:  # confident delimiters somewhere: at least one training block was split
        assert len(runs["none"][1]) > 4


def test_adaptive_blocks_end_right_after_a_confident_delimiter(copier, copy_prompts):
    """The copy model writes c1..cL then EOS: with EOS as the delimiter, the first block ends at the first EOS
    the model is confident about, or the last position it looked at, and the answers do not change."""
    prompts, ans = copy_prompts
    cfg = SamplerConfig(
        gen_length=G, steps=G, block_length=4, commit="threshold", threshold=0.9, blocks="adaptive",
        delimiter_ids=(EOS,), delimiter_threshold=0.5, adaptive_window=G, eos_early_stop="off",
    )  # fmt: skip
    for p, a in zip(prompts, ans, strict=True):
        out, ends = _block_ends(copier, [p], cfg)
        assert out.tokens[0].tolist() == a.tolist()
        assert out.tokens[0, ends[0] - 1] == EOS  # the first block ends on a delimiter ...
        assert ends[0] != 4 or a[3] == EOS  # ... instead of the fixed grid's 4


def test_adaptive_blocks_need_a_dynamic_rule_and_delimiters(llada):
    with pytest.raises(ValueError, match="dynamic commit rule"):
        SamplerConfig(blocks="adaptive", commit="static")
    with pytest.raises(ValueError, match="delimiter token ids"):
        sample(llada, [[5, 6]], SamplerConfig(gen_length=8, steps=8, block_length=4, commit="threshold",
                                              blocks="adaptive"))  # fmt: skip


# ----------------------------------------------------------------------------- end of text inside a block


def test_stop_inside_fills_only_after_a_settled_stop():
    block = torch.tensor([[4, 1, MASK, MASK], [MASK, 1, MASK, 5], [4, 5, 1, MASK]])
    masked = block == MASK
    fill = stop_inside(block, masked, torch.tensor([1]), torch.tensor([True, True, False]))
    assert fill.tolist() == [
        [False, False, True, True],  # stop at 1, everything before it final: the rest is EOS
        [False, False, False, False],  # a mask before the stop: it may still change the answer
        [False, False, False, False],  # the span before the block is not final yet
    ]


@pytest.mark.parametrize("commit", [dict(commit="static"), dict(commit="threshold", threshold=0.9)])
def test_early_stop_inside_a_block_saves_passes_and_changes_no_token_before_the_stop(copier, copy_prompts, commit):
    prompts, ans = copy_prompts
    base = dict(gen_length=G, steps=G, block_length=G // 2, **commit)
    runs = {m: sample(copier, prompts, SamplerConfig(**base, eos_early_stop=m)) for m in ("off", "all", "inside")}
    assert runs["inside"].nfe < runs["all"].nfe <= runs["off"].nfe
    for r in range(len(prompts)):
        n = runs["off"].lengths[r]
        assert runs["inside"].lengths[r] == n
        assert runs["inside"].tokens[r, : n + 1].tolist() == runs["off"].tokens[r, : n + 1].tolist()
        assert (runs["inside"].tokens[r, n:] == EOS).all()


# ----------------------------------------------------------------------------- thresholds in their units


def test_entropy_threshold_is_in_nats_and_commits_in_parallel(copier, copy_prompts):
    prompts, ans = copy_prompts
    base = dict(gen_length=G, steps=G, block_length=4, confidence="entropy", eos_early_stop="off")
    static = sample(copier, prompts, SamplerConfig(**base))
    nats = sample(copier, prompts, SamplerConfig(**base, commit="threshold", threshold=0.5))
    assert nats.steps < static.steps / 2 and nats.tokens.tolist() == ans.tolist()
    with pytest.raises(ValueError, match="nats"):
        SamplerConfig(confidence="entropy", commit="threshold", threshold=-0.1)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        SamplerConfig(confidence="max_prob", commit="threshold", threshold=2.0)
