"""Build the heavy objects a run needs (planner, realizer, embedder) from a validated `HybridConfig`.

Progress goes to a callback (the CLI prints it) because loading takes seconds to minutes on a CPU.
Failures become `SetupError` with one readable line: missing model paths, an unreachable realizer
server, a missing package.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from hybrid.config import HybridConfig
from hybrid.state import HybridContext

Progress = Callable[[str], None]


class SetupError(RuntimeError):
    """A component could not be built; the message says which and why, in one line."""


def sampler_config(cfg: HybridConfig, mode: str = "hybrid"):
    """The one `SamplerConfig` a request's planner calls use, built from its `HybridConfig` (CLI, server,
    graph context and compare all come through here; nothing reads a loaded planner's own settings): every
    sampling field of `cfg.planner` passed through, the trajectory always recorded (the plan's score reads it).
    Diffusion mode writes the answer itself: `planner.answer_length` tokens, steps scaled to match."""
    return cfg.planner.sampler_config(mode)


def build_planner(cfg: HybridConfig, progress: Progress = lambda _m: None, *, threads: int | None = None):
    """The planner `cfg` asks for; `threads` (llama.cpp engine) applies when `planner.threads` is unset."""
    import torch

    from planners.planner import Planner

    p = cfg.planner
    progress(f"loading planner ({p.model or 'embedded SmolLM2-135M diffusion planner'}) ...")
    try:
        planner = Planner.load(
            p.model,
            adapter=p.adapter,
            mask_token_id=p.mask_token_id,
            sampler=sampler_config(cfg),
            device=p.device,
            dtype=getattr(torch, p.dtype),
            engine=p.engine,
            engine_weights=p.engine_weights,
            threads=p.threads or threads,
            progress=progress,
        )
    except FileNotFoundError as e:
        raise SetupError(f"planner: {e}") from None
    except ValueError as e:
        raise SetupError(f"planner: {e}") from None
    c = planner.model.config
    if c.attention == "block_causal" and c.block_size != p.block_length:
        raise SetupError(
            f"planner.block_length={p.block_length} but this planner was trained with blocks of {c.block_size}; "
            f"set planner.block_length={c.block_size}"
        )
    return planner


def build_realizer(cfg: HybridConfig, progress: Progress = lambda _m: None):
    from realizers.base import RealizerError, SamplingParams

    r = cfg.realizer
    params = SamplingParams(max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p)
    if r.kind == "openai":
        from realizers.openai_compat import OpenAIRealizer
        from realizers.server import wait_ready

        progress(f"connecting to realizer server {r.base_url} ...")
        try:
            served = wait_ready(r.base_url, timeout_s=r.connect_timeout_s, api_key=r.api_key)
        except RealizerError as e:
            raise SetupError(f"realizer server unreachable: {e}") from None
        model = r.model or (served[0] if served else None)
        return OpenAIRealizer(
            r.base_url,
            model,
            api_key=r.api_key,
            timeout_s=r.timeout_s,
            connect_timeout_s=r.connect_timeout_s,
            max_retries=r.max_retries,
            params=params,
        )
    from realizers.embedded import embedded_realizer

    weights = f", weights {r.weights}" if r.backend == "llama_cpp" else ""
    progress(f"loading realizer (embedded SmolLM2-135M-Instruct, {r.backend}{weights}) ...")
    try:
        kwargs = {"gguf_path": r.model} if r.model else {}
        if r.backend == "llama_cpp":
            kwargs.update(
                extra_bufts=r.extra_bufts,
                max_seqs=r.max_seqs,
                weights=r.weights,
                n_threads=r.threads,
                progress=progress,
                prefix_cache=r.prefix_cache,
            )
        return embedded_realizer(r.backend, params=params, **kwargs)
    except RealizerError as e:
        raise SetupError(f"realizer: {e}") from None


def build_context(
    cfg: HybridConfig,
    progress: Progress = lambda _m: None,
    *,
    modes: set[str] | None = None,
    planner_threads: int | None = None,
    embed_on_planner_thread: bool = True,
):
    """Load what the configured mode (or every mode in `modes`) needs. `planner_threads`: the llama.cpp planner
    engine's threads when `planner.threads` is unset (default: half the cores, leaving the rest to a realizer
    that decodes at the same time; `hybrid run` passes all of them, as nothing else runs while it plans).
    `embed_on_planner_thread`: the sentence embedder's forwards run on the planner's model thread
    (`planners.model_thread`: one OpenMP pool in the process keeps the planner's passes fast); a server whose
    scoring must not wait for other requests' plans passes False."""
    modes = modes or {cfg.mode}
    planner = build_planner(cfg, progress, threads=planner_threads) if modes & {"hybrid", "diffusion"} else None
    realizer = build_realizer(cfg, progress) if modes & {"hybrid", "ar"} else None
    embed = None
    if planner is not None and cfg.score.clusterer == "embedding":
        from planners.embedding import default_embedder

        progress("loading sentence embedder (all-MiniLM-L6-v2) ...")
        embed = default_embedder()
        thread = getattr(planner, "thread", None)
        if embed_on_planner_thread and thread is not None:
            embed = functools.partial(thread.call, embed)
        embed(["warm-up"])  # load now, not in the middle of the first request
    return HybridContext(config=cfg, planner=planner, realizer=realizer, embed=embed)


def share_cores(ctx) -> bool:
    """Let the embedded llama.cpp planner use every core while the embedded realizer has nothing to decode, and
    its configured share (`planner.threads`, default half the cores) while it has: a lone hybrid request then
    plans on the whole CPU, and the two engines never oversubscribe the cores when both work. Only when
    `planner.threads` is unset; returns whether it applied."""
    import os

    from planners.llama_engine import LlamaCppEngine

    model = getattr(ctx.planner, "model", None)
    realizer_engine = getattr(ctx.realizer, "engine", None)
    if not isinstance(model, LlamaCppEngine) or ctx.config.planner.threads or not hasattr(realizer_engine, "busy"):
        return False
    cores = os.cpu_count() or 1
    model.threads_fn = lambda: model.n_threads if realizer_engine.busy else cores
    return True
