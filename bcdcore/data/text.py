"""Text datasets: IMDb reviews (word tokens) and the Python standard library's own sources as a character
corpus (`stdlib_text`, no files needed), with the unigram baseline a language model must beat."""
from __future__ import annotations

import re
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from bcdcore.data.splits import carve, load_failed, missing_files
from bcdcore.data.types import DataBundle, Split, TokenShape, data_root
from bcdcore.recipe import CLASSIFICATION, LANGUAGE_MODEL, DataConfig, RecipeError

IMDB_SEQ_LEN, TEXT_SEQ_LEN = 256, 128
PAD, UNK = 0, 1  # imdb token ids
TEXT_STREAM = 4  # the position of the stdlib_text splits


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-case words (letters and digits, with an inner apostrophe: "don't"); HTML line breaks dropped."""
    return _WORD.findall(text.lower().replace("<br />", " "))


def _read_imdb(folder: Path) -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    for label, sub in ((0, "neg"), (1, "pos")):
        for path in sorted((folder / sub).glob("*.txt")):
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
    return texts, np.asarray(labels, dtype=np.int64)


def load_imdb(cfg: DataConfig, seed: int) -> DataBundle:
    base = data_root(cfg) / "aclImdb"
    expected = [f"{s}/{c}/*.txt" for s in ("train", "test") for c in ("pos", "neg")]
    if not all(any((base / e.rsplit("/", 1)[0]).glob("*.txt")) for e in expected):
        if cfg.download:
            try:  # the tarball is plain HTTP; torchvision's helper fetches and unpacks it
                from torchvision.datasets.utils import download_and_extract_archive

                download_and_extract_archive("https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
                                             str(base.parent), md5="7c2ac02c03563afcf9b574c7e56c153a")
            except Exception as exc:
                raise load_failed(cfg, base.parent, exc) from None
        else:
            raise missing_files(cfg, base, [e for e in expected if not any((base / e.rsplit("/", 1)[0]).glob("*.txt"))])
    texts_tr, y_tr = _read_imdb(base / "train")
    texts_te, y_te = _read_imdb(base / "test")
    train_idx, val_idx = carve(np.arange(len(y_tr)), y_tr, cfg, seed)
    tokens_tr = [tokenize(t) for t in texts_tr]
    counts = Counter(w for i in train_idx for w in tokens_tr[i])  # vocabulary from our training split only
    words = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:cfg.vocab_size - 2]
    vocab = ("<pad>", "<unk>", *(w for w, _ in words))
    ids = {w: i for i, w in enumerate(vocab)}
    seq_len = cfg.seq_len or IMDB_SEQ_LEN

    def encode(docs: list[list[str]]) -> torch.Tensor:
        out = np.full((len(docs), seq_len), PAD, dtype=np.int64)
        for row, doc in enumerate(docs):
            seq = [ids.get(w, UNK) for w in doc[:seq_len]]
            out[row, :len(seq)] = seq
        return torch.from_numpy(out)

    x_tr = encode(tokens_tr)
    x_te = encode([tokenize(t) for t in texts_te])
    rows = lambda i: torch.as_tensor(i, dtype=torch.long)  # noqa: E731
    return DataBundle(
        name=cfg.name, task=CLASSIFICATION, input_shape=TokenShape((seq_len,), len(vocab)), n_outputs=2,
        train=Split(x_tr[rows(train_idx)], torch.as_tensor(y_tr[train_idx])),
        val=Split(x_tr[rows(val_idx)], torch.as_tensor(y_tr[val_idx])),
        test=Split(x_te, torch.as_tensor(y_te)), vocab=vocab)


def stdlib_corpus(max_chars: int) -> str:
    """The first `max_chars` characters of the standard library's top-level modules (Lib/*.py, sorted by
    file name, joined by blank lines). Deterministic for a given Python version."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"))
    if not files:
        raise RecipeError(f"data.name = 'stdlib_text': no standard-library sources (*.py) in {lib}; this Python "
                          f"ships without them (install its stdlib sources, e.g. the libpython3-stdlib package)")
    parts, total = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text) + 2
        if total >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def unigram_cross_entropy(train_ids: np.ndarray, eval_ids: np.ndarray, vocab_size: int) -> float:
    """Mean cross-entropy (nats/token) of `eval_ids` under the training split's token frequencies (add-one
    smoothed): the loss of the best model that ignores context."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[eval_ids].mean()) if len(eval_ids) else float("nan")


def load_stdlib_text(cfg: DataConfig, seed: int) -> DataBundle:
    text = stdlib_corpus(cfg.corpus_chars)
    seq_len = cfg.seq_len or TEXT_SEQ_LEN
    n = len(text)
    n_val, n_test = int(round(cfg.val_fraction * n)), int(round(cfg.test_fraction * n))
    n_train = n - n_val - n_test
    # Contiguous splits by position: the corpus read as a ring from a seeded offset gives train, then val,
    # then test, each one unbroken stretch of text (so no window straddles two splits).
    start = int(np.random.default_rng((seed, TEXT_STREAM)).integers(0, n))
    ring = text[start:] + text[:start]
    parts = (ring[:n_train], ring[n_train:n_train + n_val], ring[n_train + n_val:])
    for name, part in zip(("train", "val", "test"), parts):
        # train needs one window; val/test may be empty (fraction 0) but not silently too short for one
        if len(part) < seq_len + 1 and (name == "train" or len(part) > 0):
            raise RecipeError(f"data.seq_len = {seq_len}: the {name} split of stdlib_text has {len(part)} "
                              f"characters, fewer than seq_len + 1; raise data.corpus_chars or lower seq_len")
    chars = sorted(set(parts[0]))
    vocab = ("", *chars)  # id 0: a character the training split never shows
    codes = np.array([ord(c) for c in chars], dtype=np.int64)

    def encode(part: str) -> np.ndarray:
        points = np.frombuffer(part.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        pos = np.searchsorted(codes, points).clip(0, max(0, len(codes) - 1))
        return np.where(codes[pos] == points, pos + 1, 0) if len(codes) else np.zeros_like(points)

    ids = [encode(p) for p in parts]

    def windows(t: np.ndarray, every_position: bool) -> Split:
        tt = torch.from_numpy(t)
        if len(tt) < seq_len + 1:
            return Split(torch.zeros((0, seq_len), dtype=torch.int64), torch.zeros((0, seq_len), dtype=torch.int64))
        if every_position:  # overlapping windows at every offset: views of the one 1-D tensor
            return Split(tt[:-1].unfold(0, seq_len, 1), tt[1:].unfold(0, seq_len, 1))
        m = (len(tt) - 1) // seq_len  # disjoint windows: every target character is scored exactly once
        return Split(tt[:m * seq_len].view(m, seq_len), tt[1:m * seq_len + 1].view(m, seq_len))

    train, val, test = windows(ids[0], True), windows(ids[1], False), windows(ids[2], False)
    info = {"unigram_val_loss": unigram_cross_entropy(ids[0], val.y.reshape(-1).numpy(), len(vocab)),
            "unigram_test_loss": unigram_cross_entropy(ids[0], test.y.reshape(-1).numpy(), len(vocab)),
            "chars": {"train": len(parts[0]), "val": len(parts[1]), "test": len(parts[2])}, "offset": start}
    return DataBundle(name=cfg.name, task=LANGUAGE_MODEL, input_shape=TokenShape((seq_len,), len(vocab)),
                      n_outputs=len(vocab), train=train, val=val, test=test, vocab=vocab, info=info)
