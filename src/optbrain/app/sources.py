"""Your own model for the CLI: a local Hugging Face directory or ``module:factory`` + weights.

``load_model(spec, task=None, weights=None)`` returns a ``LoadedModel``. Nothing is ever
downloaded: a name that is neither a zoo model, nor a local directory, nor ``module:factory``
is a ``ValueError`` saying so (with the hint to download a hub id first). Every check runs
before the weights are read.

Tasks of a Hugging Face directory (``--task``, else inferred from ``config.json``'s
``architectures``): ``causal-lm``, ``masked-lm``, ``seq-classification``,
``image-classification`` and ``base`` (``AutoModel``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

#: task -> the transformers Auto class that loads it
TASKS: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
    "base": "AutoModel",
}
#: architecture-name suffix -> task (the first that matches wins)
_ARCH_SUFFIXES = (
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForMaskedLM", "masked-lm"),
    ("ForSequenceClassification", "seq-classification"),
    ("ForImageClassification", "image-classification"),
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)
_FACTORY = re.compile(r"^(?P<mod>[\w./\\-]+?(?:\.py)?):(?P<fn>[A-Za-z_]\w*(?:\.\w+)*)$")


@dataclass
class LoadedModel:
    """A model to compress or evaluate, with what the CLI needs to feed it.

    kind: "hf" or "module". task: a key of ``TASKS`` (None for plain modules). path: the
    model directory (None for plain modules). tokenizer: loaded from the directory, or None.
    max_length: the model's context length (None when unknown). preprocessor: the parsed
    ``preprocessor_config.json`` (empty when there is none). name: for reports and run dirs.
    """

    model: nn.Module
    kind: str
    name: str
    task: str | None = None
    path: Path | None = None
    tokenizer: Any = None
    max_length: int | None = None
    preprocessor: dict[str, Any] = field(default_factory=dict)

    @property
    def input_key(self) -> str | None:
        """The keyword a tensor batch is passed as (HF models take keywords; modules don't)."""
        if self.kind != "hf":
            return None
        return "pixel_values" if self.task == "image-classification" else "input_ids"


def is_own_model(spec: str) -> bool:
    """True when ``spec`` is not a zoo name (it then goes through ``load_model``)."""
    from . import zoo

    return spec not in zoo.names()


def infer_task(config: dict[str, Any], where: Path) -> str:
    """The task of a Hugging Face ``config.json`` (its first architecture's suffix)."""
    archs = config.get("architectures") or []
    for arch in archs:
        for suffix, task in _ARCH_SUFFIXES:
            if arch.endswith(suffix):
                return task
    return "base"


def _read_config(d: Path) -> dict[str, Any]:
    cfg = d / "config.json"
    if not cfg.is_file():
        present = ", ".join(sorted(p.name for p in d.iterdir())[:8]) or "nothing"
        raise ValueError(
            f"{d} is a directory without config.json (it holds: {present}); a Hugging Face "
            "model directory is written by model.save_pretrained(DIR)"
        )
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg} is not valid JSON: {e}") from e


def context_length(config: dict[str, Any]) -> int | None:
    """The longest sequence the model takes, from its config (None when it does not say)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        v = config.get(key)
        if isinstance(v, int) and v > 0:
            return v
    return None


def has_tokenizer(d: Path) -> bool:
    return any((d / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(d: Path) -> Any:
    """The tokenizer saved in directory ``d`` (local files only), or None when there is none."""
    if not has_tokenizer(d):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


def load_hf(d: Path, task: str | None = None) -> LoadedModel:
    """A local Hugging Face model directory, in eval mode, with its tokenizer."""
    config = _read_config(d)
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown --task {task!r}; choose one of {', '.join(TASKS)}")
    task = task or infer_task(config, d)
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            f"{d} is a Hugging Face model directory: loading it needs 'transformers' "
            "(pip install transformers)"
        ) from e
    auto = getattr(transformers, TASKS[task])
    model = auto.from_pretrained(str(d), local_files_only=True)
    model.eval()
    pre: dict[str, Any] = {}
    if (d / "preprocessor_config.json").is_file():
        pre = json.loads((d / "preprocessor_config.json").read_text())
    return LoadedModel(
        model,
        "hf",
        d.name or str(d),
        task=task,
        path=d,
        tokenizer=load_tokenizer(d),
        max_length=context_length(config),
        preprocessor=pre,
    )


def _import_factory(mod: str, fn: str) -> Any:
    if mod.endswith(".py") or "/" in mod or "\\" in mod:
        file = Path(mod if mod.endswith(".py") else mod + ".py")
        if not file.is_file():
            raise ValueError(f"--model {mod}:{fn}: no such Python file {file}")
        spec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        cwd = str(Path.cwd())
        added = cwd not in sys.path
        if added:  # the console script does not put the working directory on sys.path
            sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            raise ValueError(
                f"--model {mod}:{fn}: cannot import module {mod!r} ({e}); run from the folder "
                "that holds it, or pass a file: path/to/file.py:factory"
            ) from e
        finally:
            if added:
                sys.path.remove(cwd)
    obj: Any = module
    for part in fn.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--model {mod}:{fn}: {mod!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--model {mod}:{fn}: {fn!r} is not callable")
    return obj


def read_state_dict(weights: Path) -> dict[str, Any]:
    """A state dict from a ``.safetensors`` file or a ``torch.save`` file (read with
    ``weights_only=True``: no code runs); a ``{"state_dict": ...}`` wrapper is unwrapped."""
    if not weights.is_file():
        raise ValueError(f"--weights {weights}: no such file")
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(weights))
    import pickle

    import torch

    try:
        sd = torch.load(str(weights), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise ValueError(
            f"--weights {weights}: not a plain state dict readable with weights_only=True "
            f"({str(e).splitlines()[0]}); save model.state_dict() (or use safetensors)"
        ) from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"--weights {weights}: holds a {type(sd).__name__}, not a state dict")
    return sd


def load_factory(spec: str, weights: str | Path | None) -> LoadedModel:
    """``module:factory`` (or ``file.py:factory``) called with no arguments, then
    ``--weights`` loaded strictly into it."""
    m = _FACTORY.match(spec)
    if m is None:  # pragma: no cover - callers check first
        raise ValueError(f"--model {spec!r} is not module:factory")
    w = Path(weights) if weights else None
    if w is not None and not w.is_file():
        raise ValueError(f"--weights {w}: no such file")
    factory = _import_factory(m["mod"], m["fn"])
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec}: the factory returned a {type(model).__name__}, "
                         "not a torch.nn.Module")  # fmt: skip
    if w is None:
        print(
            f"warning: --model {spec} without --weights: the model is used as the factory "
            "returns it (a random init unless the factory loads trained weights itself)",
            file=sys.stderr,
        )
    else:
        sd = read_state_dict(w)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"--weights {w} does not fit {spec}: missing {list(missing)[:5]}, "
                f"unexpected {list(unexpected)[:5]}"
            )
    model.eval()
    return LoadedModel(model, "module", m["fn"].split(".")[-1])


def model_kind(spec: str, weights: str | Path | None = None) -> str:
    """``"hf"`` (a local directory) or ``"module"`` (``module:factory``) for ``spec``; a
    ``ValueError`` for anything else (a file, a missing path, a hub id), before any work."""
    p = Path(spec).expanduser()
    if p.is_dir():
        if weights:
            raise ValueError("--weights goes with --model module:factory, not a model directory")
        return "hf"
    if p.is_file():
        raise ValueError(
            f"--model {spec} is a file: pass the directory written by save_pretrained, or "
            "module:factory with --weights FILE for a plain state dict"
        )
    if _FACTORY.match(spec) and not spec.startswith(("/", ".", "~")):
        return "module"
    from . import zoo

    looks_like_hub = re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None
    hint = (
        f"; if {spec!r} is a Hugging Face hub id: optbrain downloads nothing, fetch it first "
        f"(huggingface-cli download {spec} --local-dir DIR) and pass --model DIR"
        if looks_like_hub
        else ""
    )
    raise ValueError(
        f"unknown model {spec!r}: no such local directory, not module:factory and not a zoo "
        f"model ({', '.join(zoo.names())}){hint}"
    )


def load_model(
    spec: str, task: str | None = None, weights: str | Path | None = None
) -> LoadedModel:
    """A local Hugging Face directory or ``module:factory`` (+ ``weights``); never downloads."""
    if model_kind(spec, weights) == "hf":
        return load_hf(Path(spec).expanduser(), task)
    if task:
        raise ValueError("--task goes with a Hugging Face model directory")
    return load_factory(spec, weights)
