"""Triton kernels for the sampler's hot path, each beside its PyTorch reference.

Kept free of side effects and heavy imports on purpose: Hugging Face transformers
probes `find_spec("kernels")` (its own optional `kernels` package shares this
import name) and may import this module while checking. Never add `__version__`
here. Import the submodules you need, e.g. `from kernels.sampling_stats import token_stats`.
"""
