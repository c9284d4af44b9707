"""Shared stand-ins for the transformers-engine tests: a byte tokenizer and tiny random-weight Llama models.

Imported by the test modules beside it (pytest puts this folder on ``sys.path``). Real weights are tested in
``test_hf_smollm2*.py``; these make the engine's mechanics cheap to check.
"""

from __future__ import annotations

from semblend.assets import tiny_llama_config

VOCAB = 256


class ByteTokenizer:
    """Minimal tokenizer: one id per byte (offset past the special ids)."""

    eos_token_id = 2
    pad_token_id = 0
    name_or_path = "bytes"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (b % (VOCAB - 3)) for b in text.encode()]}

    def decode(self, ids, skip_special_tokens=True):
        return bytes((int(i) - 3) % 256 for i in ids if int(i) >= 3).decode("latin-1")


def tiny_llama(num_layers: int = 4, seed: int = 0, **overrides):
    """A random-weight Llama of ``num_layers`` layers over :data:`VOCAB`, in eval mode (seeded: reproducible)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(num_layers=num_layers, vocab_size=VOCAB, **overrides)).eval()
