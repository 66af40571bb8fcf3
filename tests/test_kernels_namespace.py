"""Our top-level `kernels` package must not be mistaken for Hugging Face's `kernels` (README: "kernels").

transformers probes `find_spec("kernels")` and, when it finds no distribution metadata for it, imports the
package to read its `__version__`; if `is_kernels_available()` turned True it would try
`from kernels import get_kernel` and break model loading (GGUF loading asks too). With hybrid-dllm
installed, transformers even reads *our distribution's* version as the `kernels` version: a project
version inside HF kernels' supported window would flip the check. Checked in a fresh interpreter,
because transformers caches these probes per process.
"""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, sys, tempfile
from pathlib import Path

spec = importlib.util.find_spec("kernels")
assert spec is not None and Path(spec.origin).resolve() == Path("kernels/__init__.py").resolve(), spec

from transformers.utils import import_utils, is_kernels_available

# An installed hybrid-dllm lends its own version to `kernels` (0.1.0 today); HF's window is >= 0.18.2, < 0.19.
available, version = import_utils._is_package_available("kernels", return_version=True)
assert is_kernels_available() is False, f"transformers takes our kernels {version} for Hugging Face kernels"
import kernels
assert not hasattr(kernels, "__version__")
assert "kernels.sampling_stats" not in sys.modules  # the probe imported the bare package at most

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
with tempfile.TemporaryDirectory() as tmp:
    LlamaForCausalLM(config).save_pretrained(tmp)
    model = AutoModelForCausalLM.from_pretrained(tmp)
logits = model(torch.tensor([[1, 2, 3]])).logits
assert logits.shape == (1, 3, 64)
assert is_kernels_available() is False
print("ok")
"""


def test_transformers_does_not_take_our_kernels_for_hf_kernels():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")
