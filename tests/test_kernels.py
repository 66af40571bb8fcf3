"""Triton sampler kernels against their PyTorch reference.

On a CPU machine the Triton path runs in the Triton interpreter: `token_stats_triton` interprets kernels
launched on CPU tensors by itself, whatever TRITON_INTERPRET said when triton was imported, so these tests
need no environment set-up and do not depend on test-module import order. Interpreted programs are slow
(tens of ms each), so shapes keep the number of rows x splits small; tiles are shrunk with KernelConfig to
reach the multi-tile and multi-split paths on small vocabularies, and one case runs the real launch
configuration at V = 151936.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from kernels import sampling_stats as ss  # noqa: E402
from kernels.sampling_stats import (  # noqa: E402
    KernelConfig,
    TokenStats,
    backend_for,
    select_backend,
    token_stats,
    token_stats_reference,
    token_stats_triton,
)

REPO = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (rtol, atol) for prob / margin and for entropy (nats). Both paths upcast the same rounded inputs to
# float32, so the input dtype does not move the error; it is float32 accumulation over V terms (the
# reference's materialised softmax is the less exact of the two: ~3e-5 nats at V = 160k).
TOL = {
    torch.float32: {"p": (1e-4, 2e-6), "h": (1e-5, 1e-4)},
    torch.float16: {"p": (1e-4, 2e-6), "h": (1e-5, 1e-4)},
    torch.bfloat16: {"p": (1e-4, 2e-6), "h": (1e-5, 1e-4)},
}


def _logits(shape, dtype, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _uniform(shape, seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _oracle(logits, token, exclude_ids=None):
    """prob of `token`, entropy and margin in float64 from the (rounded) logits."""
    x = logits.double()
    if exclude_ids is not None:
        x = x.index_fill(-1, torch.as_tensor(exclude_ids).long(), float("-inf"))
    logp = torch.log_softmax(x, -1)
    p = logp.exp()
    entropy = -(p * logp.nan_to_num(neginf=0.0)).sum(-1)
    top = p.topk(min(2, p.shape[-1]), -1).values
    margin = top[..., 0] - (top[..., 1] if top.shape[-1] > 1 else 0.0)
    return p.gather(-1, token.unsqueeze(-1)).squeeze(-1), entropy, margin


def _scores(logits, temperature, u, exclude_ids=None):
    """The reference's perturbed scores x / T + g, in float64, for judging near-ties."""
    x = logits.double()
    if exclude_ids is not None:
        x = x.index_fill(-1, torch.as_tensor(exclude_ids).long(), float("-inf"))
    return x / temperature - torch.log((-torch.log(u.double())).clamp_min(1e-30))


def _assert_same_token(got, want, scores=None):
    """Tokens equal; at temperature > 0 a differing token must be a float32 near-tie of the best score."""
    if scores is None:
        assert torch.equal(got, want)
        return
    differ = got != want
    if differ.any():
        s_got = scores.gather(-1, got.unsqueeze(-1)).squeeze(-1)[differ]
        s_want = scores.gather(-1, want.unsqueeze(-1)).squeeze(-1)[differ]
        assert torch.allclose(s_got, s_want, rtol=1e-6, atol=1e-5), (s_got, s_want)


def _check(logits, temperature=0.0, u=None, exclude_ids=None, config=None):
    """Kernel vs reference vs the float64 oracle; returns the kernel's result."""
    got = token_stats_triton(logits, temperature=temperature, u=u, exclude_ids=exclude_ids, config=config)
    want = token_stats_reference(logits, temperature=temperature, u=u, exclude_ids=exclude_ids)
    lead = logits.shape[:-1]
    assert isinstance(got, TokenStats)
    for field, dtype in zip(got, (torch.int64, torch.float32, torch.float32, torch.float32), strict=True):
        assert field.shape == lead and field.dtype == dtype
    scores = _scores(logits, temperature, u, exclude_ids) if temperature > 0 else None
    _assert_same_token(got.token, want.token, scores)
    tol = TOL[logits.dtype]
    prob, entropy, margin = _oracle(logits, got.token, exclude_ids)
    for res in (got, want):
        torch.testing.assert_close(res.margin.double(), margin, rtol=tol["p"][0], atol=tol["p"][1])
        torch.testing.assert_close(res.entropy.double(), entropy, rtol=tol["h"][0], atol=tol["h"][1])
    torch.testing.assert_close(got.prob.double(), prob, rtol=tol["p"][0], atol=tol["p"][1])
    return got


# (shape, config): V off the tile size, one row, many rows, batched, multi-tile, multi-split.
SHAPES = [
    ((1, 1000), KernelConfig(block_v=128)),  # one row, 8 tiles, V % 128 != 0
    ((24, 300), None),  # many rows, one 512-wide tile
    ((3, 7, 257), None),  # batched (B, L, V)
    ((2, 5000), KernelConfig(block_v=256, splits=3)),  # several splits merged by the combine kernel
    ((5, 1), None),  # V = 1
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,config", SHAPES, ids=[str(s) for s, _ in SHAPES])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_matches_reference(shape, config, dtype, temperature):
    logits = _logits(shape, dtype)
    u = _uniform(shape) if temperature > 0 else None
    _check(logits, temperature, u, config=config)


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_large_vocab_default_launch(temperature):
    """V = 151936 (Qwen/Dream) in bf16 with the launcher's own choice: 2048-wide tiles, 75 of them."""
    shape = (2, 151936)
    logits = _logits(shape, torch.bfloat16, seed=3)
    _check(logits, temperature, _uniform(shape) if temperature > 0 else None, exclude_ids=[151665, 7])


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_exclude_ids(temperature):
    shape = (3, 3000)
    logits = _logits(shape, torch.float32, seed=5)
    u = _uniform(shape, seed=6)
    top = logits.argmax(-1)
    logits[1, 2047] = 50.0  # a clear winner in row 1 ...
    u[2, 11] = 1.0 - 2**-24  # ... and a huge Gumbel draw in row 2: both excluded below
    ids = torch.tensor([int(top[0]), 2047, 11, 2999, 0])
    for cfg in (KernelConfig(block_v=256), KernelConfig(block_v=128, splits=4)):
        got = _check(logits, temperature, u, exclude_ids=ids, config=cfg)
        assert not torch.isin(got.token, ids).any()
    # Ids as a Python list, duplicates and an empty set behave like the tensor forms.
    a = token_stats_triton(logits, exclude_ids=[2047, 2047, 11])
    b = token_stats_triton(logits, exclude_ids=torch.tensor([11, 2047]))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    c = token_stats_triton(logits, exclude_ids=[])
    d = token_stats_triton(logits)
    assert all(torch.equal(x, y) for x, y in zip(c, d, strict=True))


def test_minus_inf_logits():
    """-inf entries (vocabulary padding) carry no mass; a whole -inf tile is fine."""
    logits = _logits((2, 1000), torch.bfloat16)
    logits[:, 700:] = float("-inf")
    logits[0, :128] = float("-inf")
    _check(logits, config=KernelConfig(block_v=128))
    _check(logits, 0.5, _uniform((2, 1000)), config=KernelConfig(block_v=128, splits=2))


def test_ties_resolve_to_lowest_id():
    """Equal maxima in one lane (tiles apart), across lanes and across splits: the lowest id wins."""
    cfg = KernelConfig(block_v=64, splits=3)
    logits = torch.zeros(4, 1000)
    logits[0, [900, 70, 134, 700]] = 5.0  # 70 and 134 share lane 6 of 64-wide tiles
    logits[1, [999, 640]] = 5.0  # different splits
    logits[2] = 1.0  # all equal
    logits[3, [3, 4]] = 2.0  # adjacent
    got = _check(logits, config=cfg)
    assert got.token.tolist() == [70, 640, 0, 3]
    assert torch.all(got.margin[[0, 1, 3]] == 0)
    torch.testing.assert_close(got.prob[2], torch.tensor(1e-3))
    torch.testing.assert_close(got.entropy[2], torch.tensor(math.log(1000.0)))
    # Sampling: constant noise makes the perturbed scores tie exactly where the logits do.
    u = torch.full((4, 1000), 0.3)
    sampled = token_stats_triton(logits, temperature=0.8, u=u, config=cfg).token
    assert sampled.tolist() == [70, 640, 0, 3]
    assert token_stats_reference(logits, temperature=0.8, u=u).token.tolist() == [70, 640, 0, 3]


def _philox_uniform(seed: int, offset: int, rows: int, cols: int) -> torch.Tensor:
    """NumPy Philox4x32-10 with the kernel's counter layout (col // 4, row, offset) and word col % 4."""
    m32 = np.uint64(0xFFFFFFFF)
    col = np.arange(cols, dtype=np.uint64)[None, :]
    shape = (rows, cols)
    c = [
        np.broadcast_to(col // 4, shape).copy(),
        np.broadcast_to(np.arange(rows, dtype=np.uint64)[:, None], shape).copy(),
        np.full(shape, offset & 0x7FFFFFFF, np.uint64),
        np.full(shape, (offset >> 31) & 0x7FFFFFFF, np.uint64),
    ]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        p0, p2 = c[0] * np.uint64(0xD2511F53), c[2] * np.uint64(0xCD9E8D57)
        c = [(p2 >> np.uint64(32)) ^ c[1] ^ k0, p2 & m32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & m32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m32, (k1 + np.uint64(0xBB67AE85)) & m32
    word = np.take_along_axis(np.stack(c, -1), np.broadcast_to(col % 4, shape)[..., None].astype(np.int64), -1)
    r = word[..., 0].astype(np.uint32).view(np.int32).astype(np.int64)
    r = np.where(r < 0, -r - 1, r).astype(np.float32) * np.float32(4.6566127342e-10)
    return torch.from_numpy(r)


def test_seeded_noise_is_philox():
    """The in-kernel noise is exactly Philox4x32-10 at (col // 4, row, offset): same tokens as passing it."""
    seed, offset, shape = 0x1234_5678_9ABC, 7, (3, 600)
    logits = _logits(shape, torch.float32, scale=0.5)
    u = _philox_uniform(seed, offset, *shape)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    for cfg in (KernelConfig(block_v=64), KernelConfig(block_v=64, splits=2)):
        seeded = token_stats_triton(logits, temperature=1.0, seed=seed, offset=offset, exclude_ids=[5, 300], config=cfg)
        explicit = token_stats_triton(logits, temperature=1.0, u=u, exclude_ids=[5, 300], config=cfg)
        assert torch.equal(seeded.token, explicit.token)
        ref = token_stats_reference(logits, temperature=1.0, u=u, exclude_ids=[5, 300])
        _assert_same_token(seeded.token, ref.token, _scores(logits, 1.0, u, [5, 300]))


def test_seeded_noise_varies_with_seed_and_offset():
    logits = torch.zeros(8, 64)  # uniform distribution: every draw is a fresh token
    draw = lambda **kw: token_stats_triton(logits, temperature=1.0, **kw).token  # noqa: E731
    a = draw(seed=1)
    assert torch.equal(a, draw(seed=1))
    assert not torch.equal(a, draw(seed=2))
    assert not torch.equal(a, draw(seed=1, offset=1))
    assert len(set(a.tolist())) > 4  # rows draw independently


def test_gumbel_max_samples_the_tempered_softmax():
    """The reference (the kernel's definition) samples softmax(logits / T); 20k draws, 5 sigma."""
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5, 1.5])
    n, temperature = 20_000, 0.7
    tokens = token_stats_reference(logits.expand(n, -1), temperature=temperature, seed=0).token
    freq = torch.bincount(tokens, minlength=6).double() / n
    p = torch.softmax(logits.double() / temperature, -1)
    assert torch.all((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-3)
    # Temperature changes the token only: prob / entropy / margin describe the untempered softmax.
    greedy = token_stats_reference(logits.expand(4, -1))
    hot = token_stats_reference(logits.expand(4, -1), temperature=5.0, seed=1)
    assert torch.equal(greedy.entropy, hot.entropy) and torch.equal(greedy.margin, hot.margin)


def test_inputs_untouched_and_never_aliased():
    for impl in (token_stats_triton, token_stats_reference):
        for dtype in (torch.float32, torch.bfloat16):
            logits = _logits((2, 300), dtype)
            before = logits.clone()
            out = impl(logits, exclude_ids=[1, 2])
            assert torch.equal(logits, before)
            for field in out:
                assert field.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr()


def test_strided_empty_and_invalid_inputs():
    wide = _logits((3, 1200), torch.float32)
    _check(wide[:, :1000], config=KernelConfig(block_v=256))  # row stride 1200
    _check(_logits((1000, 2), torch.float32).t(), config=KernelConfig(block_v=256))  # column stride 2: copied
    empty = token_stats_triton(torch.empty(0, 10))
    assert all(f.shape == (0,) for f in empty)
    with pytest.raises(ValueError, match="temperature"):
        token_stats_triton(wide, temperature=-1.0)
    with pytest.raises(ValueError, match="shape"):
        token_stats_triton(wide, temperature=1.0, u=torch.rand(3, 10))
    with pytest.raises(TypeError):
        token_stats_reference(torch.ones(2, 4, dtype=torch.int64))


def test_interpreter_leaves_triton_language_as_found():
    """Running interpreted kernels must not leave triton.language patched (compiled kernels need it)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(ss._token_stats_kernel, InterpretedFunction):
        pytest.skip("TRITON_INTERPRET=1 at import: triton's own interpreter path runs (and patches) instead")

    spaces = [tl, tl.core, tl.math, tl.standard, tl.tensor, tl.dtype]
    token_stats_triton(torch.zeros(1, 64), temperature=1.0, seed=0)  # first use may add module globals
    before = [dict(vars(s)) for s in spaces]
    token_stats_triton(torch.zeros(2, 64), temperature=1.0, seed=0, exclude_ids=[3])
    for space, old in zip(spaces, before, strict=True):
        new = vars(space)
        changed = [k for k in old if k not in new or new[k] is not old[k]]
        assert not changed, (space, changed)


def test_interpreted_launch_patches_no_class_and_no_module_globals():
    """The interpreted launch runs private copies: JITFunction itself is never patched (not even while a launch
    runs, as seen from another thread), and neither this module's globals nor triton.language's gain names."""
    import threading

    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if isinstance(ss._token_stats_kernel, InterpretedFunction):
        pytest.skip("TRITON_INTERPRET=1 at import: triton's own interpreter path runs instead")
    original = JITFunction.__dict__["__call__"]
    modules = [ss, tl.standard, tl.random, tl.core]
    names = [set(vars(m)) for m in modules]
    seen, stop = set(), threading.Event()

    def watch() -> None:
        while not stop.wait(0.001):
            seen.add(JITFunction.__dict__["__call__"] is original)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        _check(_logits((2, 300), torch.float32), 1.0, _uniform((2, 300)), config=KernelConfig(block_v=64))
        token_stats_triton(_logits((2, 300), torch.float32), temperature=1.0, seed=1)  # tl.philox
    finally:
        stop.set()
        watcher.join()
    assert seen == {True}
    for m, before in zip(modules, names, strict=True):
        assert set(vars(m)) == before, (m.__name__, set(vars(m)) - before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_cuda_matches_reference(temperature):
    """The compiled kernel (not the interpreter) on the planner's shapes, incl. the split path."""
    for rows, vocab in ((32, 126464), (256, 151936), (7, 49152)):
        logits = _logits((rows, vocab), torch.bfloat16).cuda()
        u = _uniform((rows, vocab)).cuda() if temperature > 0 else None
        got = _check(logits, temperature, u, exclude_ids=torch.tensor([126336 % vocab], device="cuda"))
        assert got.token.is_cuda
    seeded = token_stats_triton(logits, temperature=1.0, seed=3)
    assert torch.equal(seeded.token, token_stats_triton(logits, temperature=1.0, seed=3).token)


# ------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dispatch():
    ss._dispatch.cache_clear()
    yield
    ss._dispatch.cache_clear()


def test_select_backend(monkeypatch):
    assert select_backend("torch") == "torch"
    assert select_backend("triton") == "triton"
    assert select_backend(" Triton ", device_type="cpu") == "triton"
    assert select_backend("auto", device_type="cpu") == "torch"
    assert select_backend("", device_type="cpu") == "torch"
    expected = "triton" if torch.cuda.is_available() else "torch"
    assert select_backend("auto", device_type="cuda") == expected
    with pytest.raises(ValueError, match="auto, triton, torch"):
        select_backend("cuda")
    monkeypatch.setenv("HYBRID_KERNELS", "torch")
    assert select_backend() == "torch"


def test_env_override_is_read_once(monkeypatch, fresh_dispatch):
    calls = []
    spy = lambda logits, **kw: calls.append("triton") or token_stats_triton(logits, **kw)  # noqa: E731
    monkeypatch.setitem(ss._IMPLS, "triton", spy)
    monkeypatch.setenv("HYBRID_KERNELS", "triton")
    logits = _logits((2, 100), torch.float32)
    out = token_stats(logits, exclude_ids=[4])
    assert calls == ["triton"] and backend_for("cpu") == "triton"
    ref = token_stats_reference(logits, exclude_ids=[4])
    assert torch.equal(out.token, ref.token)
    monkeypatch.setenv("HYBRID_KERNELS", "torch")  # not re-read: the choice was made once
    token_stats(logits)
    assert calls == ["triton", "triton"]
    ss._dispatch.cache_clear()
    assert backend_for("cpu") == "torch"


def test_auto_uses_reference_on_cpu(monkeypatch, fresh_dispatch):
    monkeypatch.delenv("HYBRID_KERNELS", raising=False)
    assert backend_for("cpu") == "torch"
    assert backend_for("meta") == "torch"  # unknown device types use the reference
    logits = _logits((3, 50), torch.bfloat16)
    out = token_stats(logits, temperature=0.5, seed=4)
    assert torch.equal(out.token, token_stats_reference(logits, temperature=0.5, seed=4).token)


def test_package_init_is_side_effect_free():
    """`import kernels` (which transformers may do while probing for HF kernels) imports nothing heavy."""
    code = (
        "import os, sys; env = dict(os.environ); import kernels; "
        "assert dict(os.environ) == env; "
        "assert not {'torch', 'triton', 'transformers'} & set(sys.modules), sorted(sys.modules); "
        "assert not hasattr(kernels, '__version__'); "
        "assert [n for n in vars(kernels) if not n.startswith('__')] == []"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=60)
