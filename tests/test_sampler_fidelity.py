"""Fidelity: our sampler reproduces the LLaDA and Dream reference procedures token for token.

The references below are written here, independently of `planners.sampler`, from the published procedures
(LLaDA `generate.py`: low-confidence remasking, per-block transfer counts, Gumbel-max in float64, CFG;
Dream `generation_utils._sample`: shifted logits, timesteps linspace(1, eps, steps + 1), per-step counts
int(n (1 - s / t)), `maskgit_plus` / `topk_margin` / `entropy` confidences). Both run on the same tiny
checkpoints, saved to disk in the original layouts and loaded through `load_backbone`, the user path.

Two deliberate, documented differences in the reference runs:
- the mask id's logit is set to -inf before the procedure: our sampler never proposes the mask id as a token
  (a committed mask would stay masked while counting as done); LLaDA / Dream do not exclude it, relying on
  the trained model never predicting it;
- LLaDA draws Gumbel noise for every position of the sequence; only the current block's positions can be
  committed, so both draw float64 noise (B, block_length, V) for the block, per step, from the same generator
  (the noise elsewhere never changes a committed token).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from planners.loading import load_backbone, save_checkpoint
from planners.model import BackboneConfig, DiffusionBackbone
from planners.sampler import SamplerConfig, denoise
from planners.strategies import dream_counts, llada_counts

VOCAB, MASK = 128, 127


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread. On a shared 2-core machine, two OpenMP threads spinning against other
    jobs made each 8-step run ~200x slower (6 s instead of 0.03 s, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(arch: str, directory, seed: int) -> DiffusionBackbone:
    torch.manual_seed(seed)
    cfg = BackboneConfig(
        arch=arch,
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4 if arch == "llada" else 2,
        mask_token_id=MASK,
        eos_token_id=1,
        qkv_bias=arch == "dream",
        shift=arch == "dream",
    )
    model = DiffusionBackbone(cfg)
    with torch.no_grad():  # sharper distributions than the default init: fewer near-ties, like a trained model
        model.lm_head.weight.mul_(4.0)
        if arch == "dream":
            for layer in model.layers:
                layer.attn.q_proj.bias.normal_(0, 0.1)
    save_checkpoint(model, directory)
    return load_backbone(directory)


@pytest.fixture(scope="module")
def llada(tmp_path_factory) -> DiffusionBackbone:
    return _tiny("llada", tmp_path_factory.mktemp("llada"), seed=0)


@pytest.fixture(scope="module")
def dream(tmp_path_factory) -> DiffusionBackbone:
    return _tiny("dream", tmp_path_factory.mktemp("dream"), seed=1)


def _prompt(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, MASK, (1, n), generator=g)


# ----------------------------------------------------------------------------- LLaDA reference


def _llada_counts(block_mask: torch.Tensor, steps: int) -> torch.Tensor:
    m = block_mask.sum(dim=1, keepdim=True)
    counts = torch.zeros(m.size(0), steps, dtype=torch.int64) + m // steps
    for i in range(m.size(0)):
        counts[i, : int(m[i] % steps)] += 1
    return counts


@torch.no_grad()
def llada_reference(model, prompt, *, steps, gen_length, block_length, temperature, cfg_scale, generator):
    """LLaDA `generate` (low_confidence remasking), written from the paper and its reference description."""
    p_len = prompt.shape[1]
    x = torch.full((1, p_len + gen_length), MASK, dtype=torch.long)
    x[:, :p_len] = prompt
    prompt_index = x != MASK
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    for nb in range(num_blocks):
        s, e = p_len + nb * block_length, p_len + (nb + 1) * block_length
        counts = _llada_counts(x[:, s:e] == MASK, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == MASK
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = MASK
                cond, un = model(torch.cat([x, un_x])).chunk(2)
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = model(x)
            logits[..., MASK] = float("-inf")  # documented difference: the mask id is never a candidate
            l64 = logits.to(torch.float64)
            scores = l64.exp()  # Gumbel-max in float64: exp(l) / (-log u)^T
            if temperature > 0:
                noise = torch.rand((1, block_length, VOCAB), dtype=torch.float64, generator=generator)
                scores[:, s:e] = scores[:, s:e] / (-torch.log(noise)) ** temperature
            x0 = scores.argmax(-1)
            p = F.softmax(l64, dim=-1)
            x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            x0_p[:, e:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf"), dtype=torch.float64))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, idx = torch.topk(confidence[j], k=int(counts[j, i]))
                transfer[j, idx] = True
            x[transfer] = x0[transfer]
    return x[:, p_len:]


@pytest.mark.parametrize(
    "temperature,cfg_scale,block_length,steps,precision",
    [
        (0.0, 0.0, 8, 16, "float64"),
        (0.8, 0.0, 8, 16, "float64"),
        (0.0, 0.0, 32, 12, "float64"),  # fully parallel, 32 % 12 != 0: the first steps commit one more
        (0.7, 1.5, 16, 8, "float64"),  # classifier-free guidance
        (0.0, 0.0, 8, 16, "float32"),  # the default (fused-kernel) precision, greedy
    ],
)
def test_llada_low_confidence_remasking_matches_reference(
    llada, temperature, cfg_scale, block_length, steps, precision
):
    prompt = _prompt(7, seed=3)
    gen_length = 32
    ref = llada_reference(
        llada, prompt, steps=steps, gen_length=gen_length, block_length=block_length, temperature=temperature,
        cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(11),
    )  # fmt: skip
    cfg = SamplerConfig(
        gen_length=gen_length, steps=steps, block_length=block_length, temperature=temperature, cfg_scale=cfg_scale,
        confidence="max_prob", commit="static", schedule="llada", precision=precision, eos_early_stop="off",
    )  # fmt: skip
    x = torch.cat([prompt, torch.full((1, gen_length), MASK)], 1)
    out = denoise(llada, x, gen_start=7, config=cfg, generator=torch.Generator().manual_seed(11))
    assert out.tokens.tolist() == ref.tolist()
    assert out.steps == steps and out.nfe == steps * (2 if cfg_scale else 1)
    assert (out.tokens != MASK).all()


def test_llada_temperature_changes_tokens(llada):
    """Guard against a vacuous fidelity test: the noise does reach the tokens."""
    prompt = _prompt(7, seed=3)
    x = torch.cat([prompt, torch.full((1, 32), MASK)], 1)
    greedy = denoise(llada, x, gen_start=7, config=SamplerConfig(gen_length=32, steps=16, block_length=8))
    hot = SamplerConfig(gen_length=32, steps=16, block_length=8, temperature=1.0, precision="float64")
    sampled = denoise(llada, x, gen_start=7, config=hot, generator=torch.Generator().manual_seed(11))
    assert greedy.tokens.tolist() != sampled.tokens.tolist()


# ----------------------------------------------------------------------------- Dream reference


@torch.no_grad()
def dream_reference(model, prompt, *, steps, gen_length, alg, eps=1e-3):
    """Dream `_sample` at temperature 0 (no top-p / top-k, alg_temp None), from its reference description."""
    x = F.pad(prompt, (0, gen_length), value=MASK)
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == MASK
        logits = model(x)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # the shift: position i reads i - 1
        logits[..., MASK] = float("-inf")  # documented difference: the mask id is never a candidate
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        probs = torch.softmax(mask_logits, dim=-1)
        confidence, x0 = probs.max(dim=-1)
        if alg == "topk_margin":
            top = torch.sort(probs, dim=-1, descending=True).values
            confidence = top[:, 0] - top[:, 1]
        elif alg == "entropy":
            confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
        num_mask_token = mask_index.sum() / mask_index.shape[0]
        k = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        full_confidence = torch.full_like(x, float("-inf"), dtype=logits.dtype)
        full_confidence[mask_index] = confidence
        if k > 0:
            _, transfer_index = torch.topk(full_confidence, k)
            x_ = torch.zeros_like(x) + MASK
            x_[mask_index] = x0.clone()
            rows = torch.arange(x.size(0)).unsqueeze(1).expand_as(transfer_index)
            x[rows, transfer_index] = x_[rows, transfer_index]
    return x[:, prompt.shape[1] :]


@pytest.mark.parametrize(
    "alg,confidence", [("entropy", "entropy"), ("topk_margin", "margin"), ("maskgit_plus", "max_prob")]
)
@pytest.mark.parametrize("steps", [10, 24])
def test_dream_algorithms_match_reference(dream, alg, confidence, steps):
    prompt = _prompt(9, seed=5)
    gen_length = 24
    ref = dream_reference(dream, prompt, steps=steps, gen_length=gen_length, alg=alg)
    cfg = SamplerConfig(
        gen_length=gen_length, steps=steps, confidence=confidence, commit="static", schedule="dream",
        eos_early_stop="off",
    )  # fmt: skip
    x = torch.cat([prompt, torch.full((1, gen_length), MASK)], 1)
    out = denoise(dream, x, gen_start=9, config=cfg)
    assert out.tokens.tolist() == ref.tolist()
    assert out.steps == steps


def test_schedules_are_the_references_counts():
    """The named schedules give LLaDA's and Dream's per-step counts exactly."""
    m0 = torch.tensor([13, 8, 0])
    s = 4
    left, got = m0.clone(), []
    for i in range(s):
        k = llada_counts(left, m0, i, s, 1e-3)
        got.append(k.tolist())
        left = left - k
    assert torch.tensor(got).t().tolist() == _llada_counts(torch.arange(16)[None] < m0[:, None], s).tolist()
    assert left.tolist() == [0, 0, 0]
    timesteps, n = torch.linspace(1, 1e-3, 11), torch.tensor([24])
    for i in range(10):
        want = int(n.float() * (1 - timesteps[i + 1] / timesteps[i])) if i < 9 else int(n)
        k = dream_counts(n, torch.tensor([24]), i, 10, 1e-3)
        assert int(k) == want
        n = n - k
    assert int(n) == 0


# ----------------------------------------------------------------------------- Fast-dLLM's factor rule


def fast_dllm_dynamic_transfer(logits, mask_index, x, factor):
    """Fast-dLLM's `get_transfer_index_dynamic` (greedy, low_confidence), written out as upstream: per row,
    thresholds 1 - f / (n + 1) over the sorted masked confidences, the first always passes, stop at the first
    failure; `top_i == len - 1` (no failure, or only the last one failed) commits one more."""
    x0 = logits.argmax(-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf"), dtype=torch.float64))
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    n_masked = mask_index.sum(dim=1, keepdim=True)
    for j in range(confidence.shape[0]):
        ns = list(range(1, int(n_masked[j]) + 1))
        threshs = [1 - factor / (n + 1) for n in ns]
        threshs[0] = -1
        sorted_conf = torch.sort(confidence[j][mask_index[j]], dim=-1, descending=True)[0]
        top_i = 0
        for top_i in range(len(threshs)):
            if sorted_conf[top_i] < threshs[top_i]:
                break
        if top_i == 0 or top_i == len(threshs) - 1:
            top_i += 1
        _, idx = torch.topk(confidence[j], k=top_i)
        transfer[j, idx] = True
    return x0, transfer


@torch.no_grad()
def fast_dllm_factor_reference(model, prompt, *, gen_length, block_length, factor):
    """Fast-dLLM `generate` (no cache) with the factor rule: per block, decode until no mask is left."""
    p_len = prompt.shape[1]
    x = torch.full((1, p_len + gen_length), MASK, dtype=torch.long)
    x[:, :p_len] = prompt
    nfe = 0
    for nb in range(gen_length // block_length):
        s, e = p_len + nb * block_length, p_len + (nb + 1) * block_length
        while (x[:, s:e] == MASK).any():
            nfe += 1
            mask_index = x == MASK
            mask_index[:, e:] = False
            logits = model(x)
            logits[..., MASK] = float("-inf")  # documented difference: the mask id is never a candidate
            x0, transfer = fast_dllm_dynamic_transfer(logits, mask_index, x, factor)
            x[transfer] = x0[transfer]
    return x[:, p_len:], nfe


def test_factor_commit_matches_fast_dllm_transfer_on_random_confidences():
    """The vectorised rule against the per-row upstream loop, on random blocks: every mask count (1 included,
    where the upstream `top_i` special case applies) and factors from strict to loose."""
    from planners.strategies import CommitInputs, commit_factor

    g = torch.Generator().manual_seed(0)
    for trial in range(400):
        b, w = 3, int(torch.randint(1, 17, (1,), generator=g))
        factor = [0.25, 0.5, 1.0, 2.0, 4.0][trial % 5]
        logits = torch.randn(b, w, 16, generator=g) * float(torch.rand(1, generator=g) * 8)
        masked = torch.rand(b, w, generator=g) < 0.7
        masked[:, 0] |= ~masked.any(-1)  # every row has a mask
        x = torch.zeros(b, w, dtype=torch.long)
        _, ref = fast_dllm_dynamic_transfer(logits, masked, x, factor)
        conf = torch.softmax(logits.double(), -1).max(-1).values
        score = torch.where(masked, conf, float("-inf"))
        ours = commit_factor(CommitInputs(score, conf, conf, masked, None, 0.9, 0.1, factor))
        assert ours.tolist() == ref.tolist(), (trial, factor, w)


@pytest.mark.parametrize("factor,block_length", [(1.0, 8), (3.0, 8), (2.0, 32)])
def test_factor_rule_matches_fast_dllm_generate(llada, factor, block_length):
    prompt = _prompt(7, seed=5)
    ref, ref_nfe = fast_dllm_factor_reference(llada, prompt, gen_length=32, block_length=block_length, factor=factor)
    cfg = SamplerConfig(
        gen_length=32, steps=32, block_length=block_length, commit="factor", factor=factor, precision="float64",
        eos_early_stop="off",
    )  # fmt: skip
    x = torch.cat([prompt, torch.full((1, 32), MASK)], 1)
    out = denoise(llada, x, gen_start=7, config=cfg)
    assert out.tokens.tolist() == ref.tolist()
    assert out.nfe == ref_nfe


# ----------------------------------------------------------------------------- dInfer's credit decoding


class DInferCreditDecoder:
    """dInfer's `CreditThresholdParallelDecoder` (greedy, float32), written out: per block an EMA credit
    matrix (B, L, V): decay by beta after the first iteration, add p_top1^gamma at the top-1 token of masked
    positions; decide on logits + alpha log(credit + 1) with the threshold rule of `get_transfer_index_threshold`
    (commit confidence >= min(max confidence - 1e-5, threshold))."""

    def __init__(self, threshold, alpha=0.7, gamma=0.2, beta=0.8):
        self.threshold, self.alpha, self.gamma, self.beta = threshold, alpha, gamma, beta
        self.mats, self.iters = {}, {}

    def decode(self, logits, s, e, x):
        mask_index = x[:, s:e] == MASK
        key = (s, e)
        b, length, v = logits.shape
        if key not in self.mats:
            self.mats[key], self.iters[key] = torch.zeros((b, length, v), dtype=torch.float32), 0
        mat = self.mats[key]
        if self.iters[key] > 0:
            mat.mul_(self.beta)
        probs = F.softmax(logits.to(torch.float32), dim=-1)
        top1_p, top1_i = probs.max(-1)
        mat.scatter_add_(2, top1_i.unsqueeze(-1), (top1_p.pow(self.gamma) * mask_index).unsqueeze(-1))
        fused = logits + self.alpha * torch.log(mat + 1)
        self.iters[key] += 1
        x0 = fused.argmax(-1)
        p = F.softmax(fused.to(torch.float32), dim=-1)
        x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
        curr = x[:, s:e]
        x0 = torch.where(mask_index, x0, curr)
        confidence = torch.where(mask_index, x0_p, float("-inf"))
        actual = (confidence.max(dim=1)[0] - 1e-5).clamp(-1000, self.threshold).unsqueeze(-1)
        transfer = (confidence >= actual) & mask_index
        x[:, s:e] = torch.where(transfer, x0, curr)


@torch.no_grad()
def dinfer_credit_reference(model, prompt, *, gen_length, block_length, threshold, **credit):
    """dInfer's block-wise decoding (no cache): per block, forward the whole sequence and decode the block's
    logits until it has no mask."""
    p_len = prompt.shape[1]
    x = torch.full((1, p_len + gen_length), MASK, dtype=torch.long)
    x[:, :p_len] = prompt
    dec, nfe = DInferCreditDecoder(threshold, **credit), 0
    for nb in range(gen_length // block_length):
        s, e = p_len + nb * block_length, p_len + (nb + 1) * block_length
        while (x[:, s:e] == MASK).any():
            nfe += 1
            logits = model(x)
            logits[..., MASK] = float("-inf")  # documented difference: the mask id is never a candidate
            dec.decode(logits[:, s:e], s, e, x)
    return x[:, p_len:], nfe


@pytest.mark.parametrize(
    "threshold,credit",
    [(0.9, {}), (0.3, {}), (0.5, dict(alpha=2.0, gamma=0.5, beta=0.5))],
)
def test_credit_decoding_matches_dinfer(llada, threshold, credit):
    prompt = _prompt(7, seed=9)
    ref, ref_nfe = dinfer_credit_reference(llada, prompt, gen_length=32, block_length=8, threshold=threshold, **credit)
    names = {"alpha": "credit_alpha", "gamma": "credit_gamma", "beta": "credit_decay"}
    cfg = SamplerConfig(
        gen_length=32, steps=32, block_length=8, commit="threshold", threshold=threshold, boost="credit",
        eos_early_stop="off", **{names[k]: v for k, v in credit.items()},
    )  # fmt: skip
    x = torch.cat([prompt, torch.full((1, 32), MASK)], 1)
    out = denoise(llada, x, gen_start=7, config=cfg)
    assert out.tokens.tolist() == ref.tolist()
    assert out.nfe == ref_nfe
    plain = denoise(llada, x, gen_start=7, config=SamplerConfig(**{**cfg.to_dict(), "boost": "none"}))
    assert plain.nfe >= out.nfe  # credit only ever adds confidence to tokens already predicted
