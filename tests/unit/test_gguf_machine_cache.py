"""The GGUF is dequantised once per machine: a second checkout (a second `_load_gguf` of the same
file) loads the cached `save_pretrained` copy, with the same weights, instead of dequantising."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from retroloop.models import loading
from retroloop.models.loading import build_tiny_tokenizer


def _fake_dequantise(calls: list):
    def dequantise(path):
        calls.append(path)
        tok = build_tiny_tokenizer(["a tiny corpus for a tiny tokenizer"] * 4, vocab_size=64)
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
        return LlamaForCausalLM(config).eval(), tok

    return dequantise


def test_second_load_of_the_same_file_reads_the_machine_cache(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(loading, "_dequantise_gguf", _fake_dequantise(calls))
    monkeypatch.setenv("RETROLOOP_CACHE_DIR", str(tmp_path / "machine"))
    gguf = tmp_path / "clone1" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF weights")
    first, _ = loading._load_gguf(gguf)
    other = tmp_path / "clone2" / "m.gguf"  # another checkout, the same file
    other.parent.mkdir()
    other.write_bytes(b"GGUF weights")
    second, tok = loading._load_gguf(other)
    assert len(calls) == 1  # dequantised once
    assert tok.get_vocab() and len(list((tmp_path / "machine" / "gguf").iterdir())) == 1
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    other.write_bytes(b"other GGUF weights")  # another file: another key, dequantised again
    loading._load_gguf(other)
    assert len(calls) == 2


def test_an_empty_cache_variable_turns_the_machine_cache_off(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(loading, "_dequantise_gguf", _fake_dequantise(calls))
    monkeypatch.setenv("RETROLOOP_CACHE_DIR", "")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF weights")
    loading._load_gguf(gguf)
    loading._load_gguf(gguf)
    assert len(calls) == 2 and loading.machine_cache_dir() is None
