"""A small GPT-style byte-level decoder LM trained offline on Python's own standard library,
to measure weight-only quantization on (issue 25 item 5; no hub access here).

Model (:class:`GPT`): GPT-2's pre-LN decoder (Radford et al. 2019): learned token and position
embeddings, ``n_layers`` blocks ``x = x + Attn(LN₁(x))``, ``x = x + MLP(LN₂(x))`` with causal
softmax attention ``softmax(QKᵀ/√d_h + M)V`` (separate ``q``/``k``/``v`` Linears, so the three
read one LayerNorm output as AWQ's groups expect) and ``MLP(x) = W₂·GELU(W₁x)``, a final LayerNorm
and an ``lm_head`` Linear tied to the token embedding (GPT-2's weight tying). Every weight
matrix is a plain :class:`torch.nn.Linear`, so ptqkit sees them. Vocabulary: the 256 byte values.

Corpus (:func:`corpus`), deterministic, shipped with Python: every ``.py`` file of the standard
library (``sysconfig.get_paths()['stdlib']``, without ``site-packages``, the ``test``/``tests``
packages and ``idlelib``/``lib2to3`` test data), sorted by path, plus the help text
``pydoc_data.topics``. **Held-out split**: the modules in :data:`HELD_OUT` (a fixed list of
stdlib files and packages); everything else trains. The split depends on the Python version's
stdlib, so the cache key includes a digest of the training bytes.

Training (:func:`train`): AdamW (β = 0.9, 0.95, weight decay 0.1 on matrices), linear warm-up
then cosine decay, random windows of the training bytes drawn from a seeded generator; one
thread (``torch.set_num_threads(1)``: the machine is shared). The weights are cached in
``~/.cache/ptqkit/lm/<hash of config + corpus>.pt`` (:func:`trained`), so later runs load them.

Metric (:func:`perplexity`): mean next-byte cross-entropy ``L`` (nats) over non-overlapping
windows of the held-out bytes, every position predicted with the window before it;
perplexity ``e^L`` and bits per byte ``L / ln 2``. :func:`unigram_bpb` is the baseline a model
must beat: the entropy of the training bytes' frequencies, scored on the held-out bytes.

    python bench/lm.py            # train (or load) the default model, print held-out numbers
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: held-out stdlib modules (files or packages, relative to the stdlib directory)
HELD_OUT = (
    "argparse.py",
    "csv.py",
    "textwrap.py",
    "heapq.py",
    "fractions.py",
    "json",
    "string.py",
    "shlex.py",
    "calendar.py",
    "difflib.py",
)
_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
CACHE = Path.home() / ".cache" / "ptqkit" / "lm"


@dataclass(frozen=True)
class LMConfig:
    """Model and training settings (the cache key hashes all of them)."""

    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 6
    ctx: int = 128
    steps: int = 800
    batch: int = 24
    lr: float = 2e-3
    warmup: int = 100
    seed: int = 0

    @property
    def vocab(self) -> int:
        return 256


class Block(nn.Module):
    """``x + Attn(LN₁ x)`` then ``x + MLP(LN₂ x)`` (pre-LN), causal attention."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        q, k, v = self._split(self.q(h)), self._split(self.k(h)), self._split(self.v(h))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(x.shape))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """``forward(ids [B, T] int64) -> logits [B, T, 256]``; ``T <= cfg.ctx``."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.tok = nn.Embedding(cfg.vocab, d)
        self.pos = nn.Embedding(cfg.ctx, d)
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, cfg.vocab, bias=False)
        self.lm_head.weight = self.tok.weight  # tied (GPT-2)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                deep = name.endswith(("proj.weight", "fc2.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layers) if deep else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _files(stdlib: Path) -> list[tuple[Path, bool]]:
    """Every stdlib ``.py`` file (sorted) with whether it is held out."""
    out = []
    for p in sorted(stdlib.rglob("*.py")):
        rel = p.relative_to(stdlib)
        if _SKIP_DIRS.intersection(rel.parts[:-1]) or rel.parts[0].startswith("plat-"):
            continue
        out.append((p, rel.parts[0] in HELD_OUT))
    return out


def corpus() -> tuple[bytes, bytes]:
    """``(train, held_out)`` bytes: the stdlib sources (split by :data:`HELD_OUT`), the training
    part followed by ``pydoc_data.topics``' help text."""
    import pydoc_data.topics as topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for p, out in _files(stdlib):
        (held if out else train).append(p.read_bytes())
    train += [topics.topics[k].encode("utf-8") for k in sorted(topics.topics)]
    if not held:
        raise RuntimeError(f"no held-out module of {HELD_OUT} found under {stdlib}")
    return b"\n".join(train), b"\n".join(held)


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def windows(data: torch.Tensor, ctx: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` random windows of ``ctx + 1`` bytes (inputs and next-byte targets)."""
    starts = torch.randint(0, data.numel() - ctx - 1, (count,), generator=gen)
    return torch.stack([data[s : s + ctx + 1] for s in starts.tolist()])


def eval_windows(data: torch.Tensor, ctx: int, count: int | None = None) -> torch.Tensor:
    """Non-overlapping ``ctx + 1``-byte windows from the start of ``data`` (at most ``count``),
    consecutive windows sharing their boundary byte so every byte after the first is a target."""
    n = (data.numel() - 1) // ctx
    n = n if count is None else min(n, count)
    return torch.stack([data[i * ctx : i * ctx + ctx + 1] for i in range(n)])


def key(cfg: LMConfig, train_bytes: bytes) -> str:
    blob = (
        json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()
        + hashlib.sha256(train_bytes).digest()
    )
    return hashlib.sha256(blob).hexdigest()[:16]


def _lr(cfg: LMConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(cfg: LMConfig, data: torch.Tensor, log_every: int = 0) -> GPT:
    """Train :class:`GPT` on ``data`` (byte ids), seeded and on the current thread count."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    rest = [p for n, p in model.named_parameters() if p.dim() != 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        w = windows(data, cfg.ctx, cfg.batch, gen)
        loss = F.cross_entropy(model(w[:, :-1]).reshape(-1, cfg.vocab), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            el = time.perf_counter() - t0
            print(
                f"step {step:5d} loss {loss.item():.3f} ({el:.0f} s)", file=sys.stderr, flush=True
            )
    return model.eval()


def trained(
    cfg: LMConfig = LMConfig(), log_every: int = 100, train_threads: int = 1
) -> tuple[GPT, dict]:
    """The model for ``cfg``, from the cache or trained (``train_threads`` threads: 1 where the
    machine is shared) and cached; with a record (``key``, ``train_s``, ``params``)."""
    train_bytes, _ = corpus()
    k = key(cfg, train_bytes)
    path = CACHE / f"gpt-{k}.pt"
    model = GPT(cfg)
    if path.exists():
        blob = torch.load(path, weights_only=True)
        model.load_state_dict(blob["state"])
        return model.eval(), blob["record"]
    threads = torch.get_num_threads()
    torch.set_num_threads(train_threads)
    t0 = time.perf_counter()
    try:
        model = train(cfg, as_tensor(train_bytes), log_every)
    finally:
        torch.set_num_threads(threads)
    record = {"key": k, "train_s": time.perf_counter() - t0, "params": n_params(model)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"state": model.state_dict(), "record": record, "config": dataclasses.asdict(cfg)}, tmp
    )
    tmp.replace(path)
    return model, record


def n_params(model: nn.Module) -> int:
    """Distinct parameters (the tied embedding / head counted once)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def perplexity(model: nn.Module, wins: torch.Tensor, batch: int = 32) -> dict[str, float]:
    """Held-out mean next-byte loss ``L`` (nats): ``ppl = e^L``, ``bpb = L / ln 2``."""
    total, count = 0.0, 0
    for i in range(0, wins.shape[0], batch):
        w = wins[i : i + batch]
        logits = model(w[:, :-1])
        total += float(
            F.cross_entropy(logits.reshape(-1, 256).float(), w[:, 1:].reshape(-1), reduction="sum")
        )
        count += w[:, 1:].numel()
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "bpb": loss / math.log(2)}


def unigram_bpb(train_bytes: bytes, held: bytes) -> float:
    """Bits per byte of the training bytes' (add-one smoothed) frequencies on ``held``."""
    counts = torch.bincount(as_tensor(train_bytes), minlength=256).double() + 1
    logp = (counts / counts.sum()).log2()
    return float(-logp[as_tensor(held)].mean())


def calibration(
    cfg: LMConfig, count: int = 128, batch: int = 16, seed: int = 1
) -> list[torch.Tensor]:
    """``count`` random training-split windows of ``cfg.ctx`` bytes, in batches of ``batch``
    (a different generator seed from training's)."""
    train_bytes, _ = corpus()
    w = windows(as_tensor(train_bytes), cfg.ctx, count, torch.Generator().manual_seed(seed))
    return list(w[:, :-1].split(batch))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=LMConfig.steps)
    ap.add_argument("--eval", type=int, default=256, help="held-out windows")
    ap.add_argument("--threads", type=int, default=1, help="training threads (1: shared)")
    args = ap.parse_args()
    cfg = dataclasses.replace(LMConfig(), steps=args.steps)
    train_bytes, held = corpus()
    print(f"train {len(train_bytes):,} bytes, held-out {len(held):,} bytes", flush=True)
    model, rec = trained(cfg, train_threads=args.threads)
    r = perplexity(model, eval_windows(as_tensor(held), cfg.ctx, args.eval))
    print(json.dumps({**rec, **r, "unigram_bpb": unigram_bpb(train_bytes, held)}), flush=True)


if __name__ == "__main__":
    main()
