"""The tiny random model: a seeded decoder of any tested family (`TinyModelSpec.architecture`)
built from a config in code, with a byte-level BPE tokenizer trained in code on the prepared
corpus (no download) and, with `tiny.train_steps > 0`, trained for a few seconds on the train
split. `prepare.model.source: tiny_random` (`retroloop.models.loading.load_source_model`) is
its entry point in the pipeline; tests build it directly.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch
from transformers import PreTrainedTokenizerBase

from retroloop.config import TinyModelSpec
from retroloop.errors import ModelError
from retroloop.steplog import edge_means

log = logging.getLogger(__name__)

# ChatML, as SmolLM2-Instruct uses; the tiny tokenizer gets the same template so the
# tiny profile exercises the same chat-template checks as the real model.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE trained in code on `corpus`, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    """A seeded random decoder of `spec.architecture` built from a config in code: the family's
    own config class with its defaults (a family's distinctive options stay as transformers sets
    them), `head_dim = hidden / heads` for families whose default head_dim is not (Gemma's 256)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    match spec.architecture:
        case "llama":
            model = LlamaForCausalLM(LlamaConfig(**common))
        case "qwen2":
            model = Qwen2ForCausalLM(Qwen2Config(**common))
        case other:
            head_dim = spec.hidden_size // spec.num_attention_heads
            config = CONFIG_MAPPING[other](**common, head_dim=head_dim)
            model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def train_tiny_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    spec: TinyModelSpec,
) -> dict[str, float]:
    """Next-token training of the tiny model on `texts`: `spec.train_steps` AdamW steps at a
    constant `spec.train_lr`, each on `spec.train_batch` windows of `spec.train_seq_len` tokens
    drawn from the concatenated, eos-separated texts. Seeded by `spec.seed`, so deterministic;
    a few seconds on one CPU thread. Returns the first and last steps' mean loss (nats)."""
    if not texts:
        raise ModelError(
            "prepare.model.tiny.train_steps: no training text to train the tiny model on"
        )
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    stream = torch.tensor(ids, dtype=torch.long)
    L = min(spec.train_seq_len, len(stream) - 1)
    gen = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.train_lr, weight_decay=spec.train_weight_decay
    )
    model.train()
    losses = []
    for _ in range(spec.train_steps):
        starts_B = torch.randint(0, len(stream) - L, (spec.train_batch,), generator=gen)
        ids_B_T = torch.stack([stream[s : s + L] for s in starts_B.tolist()])
        loss = model(input_ids=ids_B_T, labels=ids_B_T, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.train_max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    first, last = edge_means(losses)  # the first / last 10% (logging.summary_fraction's default)
    log.info("tiny model: %d steps, loss %.3f -> %.3f", spec.train_steps, first, last)
    return {"train_loss_start": first, "train_loss_end": last}


# Trained tiny weights by (spec, texts, vocabulary): the test suite prepares the same tiny model
# in several fixtures of one process, and training is a pure function of these inputs.
_TRAINED: dict[str, tuple[dict[str, torch.Tensor], dict[str, float]]] = {}


def train_tiny_model_cached(
    model, tokenizer, texts: list[str], spec: TinyModelSpec
) -> dict[str, float]:
    """`train_tiny_model`, or the weights and statistics it gave for the same inputs earlier in
    this process (`_TRAINED`), loaded into `model`; the global RNG is left as it was."""
    key = hashlib.sha256(
        json.dumps([spec.model_dump(), texts, sorted(tokenizer.get_vocab().items())]).encode()
    ).hexdigest()
    if key not in _TRAINED:
        with torch.random.fork_rng():
            stats = train_tiny_model(model, tokenizer, texts, spec)
        _TRAINED[key] = ({k: v.clone() for k, v in model.state_dict().items()}, stats)
    state, stats = _TRAINED[key]
    model.load_state_dict(state)
    return dict(stats)
