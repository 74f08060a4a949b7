"""Word lists, the character vocabulary, training examples and splits.

Everything here reproduces the makemore MLP lecture's data pipeline exactly, so that
losses are comparable with the lecture's numbers:

* a word list is one word per line; surrounding whitespace is stripped and blank lines
  are dropped (:func:`read_words`);
* the vocabulary is ``'.'`` (index 0, the start/end token) followed by the sorted
  characters of the corpus from index 1 (:class:`Vocab`);
* examples are built like the notebook: the context starts as ``[0] * block_size`` and
  slides over ``word + '.'``; ``X[i]`` is the context and ``Y[i]`` the next character
  (:func:`build_examples`, vectorized with numpy);
* the default split is the lecture's: ``random.seed(42); random.shuffle(words)``, then
  80 % / 10 % / 10 % of the *words* (:func:`split_words`).

Character policy (what happens to "unusual" characters)
-------------------------------------------------------
The model is character-level over whatever characters the corpus contains, so nothing is
silently mapped to ASCII. Each line is

1. stripped of surrounding whitespace; blank lines are dropped;
2. normalized to Unicode NFC, so that an accented letter typed as one code point or as a
   letter plus a combining accent is the same character;
3. lower-cased (``str.lower``) unless ``lowercase=False`` (``--keep-case``): names
   lists mix "Emma" and "emma", and one case halves the vocabulary the model must learn;
4. kept with every other character as it is: accents, digits, hyphens, apostrophes and
   inner spaces each become one more vocabulary entry.

A line is *unusable*, and skipped with a warning that names the file and line, when it
contains ``'.'`` (reserved for the start/end token: a name like "st. john" would end the
word in the middle) or a non-printable character (``str.isprintable``: control and format
characters such as a tab or a zero-width joiner, and spaces other than the plain space),
which would print invisibly in samples. A file with no usable word is
an error. The vocabulary is built from the whole corpus before splitting, like the
lecture, so dev and test never contain unknown characters; a character outside the
vocabulary at evaluation or sampling time is a :class:`VocabError`.
"""

from __future__ import annotations

import random
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "DataError",
    "VocabError",
    "Corpus",
    "Vocab",
    "Split",
    "read_words",
    "normalize_word",
    "load_corpus",
    "embedded_corpus",
    "build_examples",
    "split_words",
    "START_END",
    "LECTURE_SPLIT_SEED",
]

#: The start/end token. It is vocabulary index 0 and may not occur inside a word.
START_END = "."
#: ``random.seed(42)`` in the lecture, before shuffling the words.
LECTURE_SPLIT_SEED = 42
#: The corpus used when no ``--data`` is given (see :func:`embedded_corpus`).
EMBEDDED_NAME = "names package (US Census 1990 first names)"


class DataError(ValueError):
    """A word list that cannot be used: missing, unreadable, empty or without usable words."""


class VocabError(ValueError):
    """A character that is not in the vocabulary of a run."""


# --------------------------------------------------------------------------- reading


def normalize_word(line: str, lowercase: bool = True) -> tuple[str | None, str | None]:
    """Apply the character policy of this module to one line.

    Returns ``(word, None)`` for a usable word, ``(None, None)`` for a blank line and
    ``(None, reason)`` for an unusable one, so callers can report *why* a line was skipped.
    """
    word = line.strip()
    if not word:
        return None, None
    word = unicodedata.normalize("NFC", word)
    if lowercase:
        word = word.lower()
    if START_END in word:
        return None, f"contains {START_END!r}, the reserved start/end token"
    if not word.isprintable():  # one C-level scan; find the culprit only on failure
        ch = next(c for c in word if not c.isprintable())
        return None, (f"contains the non-printable character U+{ord(ch):04X} "
                      f"({unicodedata.name(ch, unicodedata.category(ch))})")
    return word, None


def _words_from_text(text: str, source: str, lowercase: bool,
                     warn=None) -> list[str]:
    """Turn a file's text into words under the character policy; report skipped lines."""
    words: list[str] = []
    skipped: list[tuple[int, str, str]] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        word, reason = normalize_word(line, lowercase)
        if word is not None:
            words.append(word)
        elif reason is not None:
            skipped.append((lineno, line.strip(), reason))
    if not words:
        if skipped:
            first = "; ".join(f"line {n}: {w!r} {r}" for n, w, r in skipped[:3])
            raise DataError(f"{source}: no usable words: all {len(skipped)} non-blank lines "
                            f"were rejected ({first})")
        raise DataError(f"{source}: contains no words (only blank lines)")
    if skipped:
        warn = warn or (lambda msg: print(msg, file=sys.stderr))
        shown = "; ".join(f"line {n}: {w!r} {r}" for n, w, r in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warn(f"warning: {source}: skipped {len(skipped)} unusable line(s): {shown}{more}")
    return words


def read_words(path: str | Path, lowercase: bool = True, warn=None) -> list[str]:
    """Read a word list (one word per line) under the module's character policy.

    Every failure is a :class:`DataError` whose message names the file, because the
    usual cause is a wrong ``--data`` path and the traceback alone would not say which.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{p}: is a directory, not a word list") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read: {e.strerror or e}") from None
    if not raw.strip():
        raise DataError(f"{p}: is empty" if not raw else f"{p}: contains no words (only blank lines)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: is not UTF-8 text (undecodable byte at offset {e.start}); "
                        f"a word list must be UTF-8, one word per line") from None
    return _words_from_text(text, str(p), lowercase, warn)


@dataclass
class Corpus:
    """A word list with where it came from, so runs can say what they trained on."""

    words: list[str]
    name: str
    path: str | None = None
    lowercase: bool = True

    def describe(self) -> str:
        where = self.path if self.path else self.name
        return f"{where}: {len(self.words):,} words"

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "lowercase": self.lowercase,
                "num_words": len(self.words)}


def embedded_corpus() -> Corpus:
    """The offline default corpus: first names from the ``names`` package on PyPI.

    ``names`` ships the US Census 1990 first-name lists ``dist.male.first`` and
    ``dist.female.first`` (name in the first column, upper case). Their union,
    lower-cased and de-duplicated in file order (male list first), is 5,163 names: a
    smaller cousin of the lecture's names.txt that is present on every install because
    ``names`` is a dependency.
    """
    try:
        from importlib import resources

        root = resources.files("names")
        texts = [(root / f).read_text(encoding="ascii") for f in ("dist.male.first", "dist.female.first")]
    except (ModuleNotFoundError, FileNotFoundError, OSError) as e:  # pragma: no cover
        raise DataError("the embedded corpus needs the 'names' package (pip install names); "
                        f"it could not be read: {e}. Or pass --data PATH.") from None
    seen: dict[str, None] = {}
    for text in texts:
        for line in text.splitlines():
            cols = line.split()
            if cols:
                seen.setdefault(cols[0].lower(), None)
    return Corpus(words=list(seen), name=EMBEDDED_NAME, path=None, lowercase=True)


def load_corpus(path: str | Path | None, lowercase: bool = True, warn=None) -> Corpus:
    """The word list at ``path``, or the embedded corpus when ``path`` is None."""
    if path is None:
        return embedded_corpus()
    return Corpus(words=read_words(path, lowercase, warn), name=Path(path).name,
                  path=str(path), lowercase=lowercase)


# --------------------------------------------------------------------------- vocabulary


@dataclass
class Vocab:
    """Characters <-> indices: ``'.'`` is 0, the sorted corpus characters follow from 1.

    The sorted order makes the vocabulary a function of the character *set* only, exactly
    like the lecture's ``stoi = {s: i + 1 for i, s in enumerate(sorted(set(...)))}``.
    """

    chars: list[str] = field(default_factory=list)  # excluding '.'

    def __post_init__(self):
        chars = list(self.chars)
        if START_END in chars:
            raise VocabError(f"{START_END!r} is the start/end token and cannot be a vocabulary character")
        if chars != sorted(set(chars)):
            raise VocabError("vocabulary characters must be unique and sorted")
        if any(len(c) != 1 for c in chars):
            raise VocabError("vocabulary entries must be single characters")
        self.chars = chars
        self.itos: list[str] = [START_END] + chars
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.itos)}
        # Sorted code points -> index, for vectorized encoding with np.searchsorted.
        self._codes = np.array([ord(c) for c in self.itos], dtype=np.int64)
        self._order = np.argsort(self._codes)
        self._sorted_codes = self._codes[self._order]

    @classmethod
    def from_words(cls, words: Iterable[str]) -> "Vocab":
        return cls(sorted(set("".join(words))))

    @property
    def size(self) -> int:
        return len(self.itos)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.chars == other.chars

    def to_dict(self) -> dict:
        return {"start_end": START_END, "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        if not isinstance(d, dict) or not isinstance(d.get("chars"), str):
            raise VocabError(f"not a saved vocabulary: {d!r:.80}")
        if d.get("start_end", START_END) != START_END:
            raise VocabError(f"saved vocabulary uses start/end token {d['start_end']!r}, expected {START_END!r}")
        return cls(list(d["chars"]))

    def _unknown(self, ch: str, word: str | None = None, where: str = "") -> VocabError:
        ctx = f" in {word!r}" if word is not None else ""
        return VocabError(f"character {ch!r} (U+{ord(ch):04X}){ctx}{where} is not in the vocabulary "
                          f"of {self.size} symbols ({''.join(self.itos)!r})")

    def encode(self, word: str) -> list[int]:
        """Indices of the characters of ``word`` (no start/end token added)."""
        try:
            return [self.stoi[c] for c in word]
        except KeyError as e:
            raise self._unknown(e.args[0], word) from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[int(i)] for i in ids)

    def encode_concat(self, text: str, words: Sequence[str] | None = None,
                      lengths: np.ndarray | None = None, source: str = "") -> np.ndarray:
        """Vectorized :meth:`encode` of a concatenation of words: int64 array of indices.

        ``words``/``lengths`` are only used to name the offending word in the error.
        """
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        pos = np.searchsorted(self._sorted_codes, codes)
        pos = np.minimum(pos, len(self._sorted_codes) - 1)
        bad = self._sorted_codes[pos] != codes
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            word = None
            if words is not None and lengths is not None:
                w = int(np.searchsorted(np.cumsum(lengths), k, side="right"))
                word = words[w]
            raise self._unknown(chr(int(codes[k])), word, f" ({source})" if source else "")
        return self._order[pos]


# --------------------------------------------------------------------------- examples


def build_examples(words: Sequence[str], vocab: Vocab, block_size: int,
                   source: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Every (context, next character) pair of ``words``, exactly as the lecture builds them.

    The notebook's loop is, per word::

        context = [0] * block_size
        for ch in w + '.':
            X.append(context); Y.append(stoi[ch]); context = context[1:] + [stoi[ch]]

    Here the same rows come out in the same order without a Python loop per character:
    every word is laid out as ``block_size`` zeros, its characters and a closing 0 in one
    flat stream, and each example is a sliding window over that stream. On the lecture's
    32,033 names this takes milliseconds instead of about a second.

    Returns ``X`` int64 ``[N, block_size]`` and ``Y`` int64 ``[N]``.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    T = int(block_size)
    n = len(words)
    if n == 0:
        return torch.zeros((0, T), dtype=torch.int64), torch.zeros((0,), dtype=torch.int64)
    lens = np.fromiter((len(w) for w in words), dtype=np.int64, count=n)
    ids = vocab.encode_concat("".join(words), words, lens, source)
    # Word k occupies seg[k] = T + len + 1 slots of the stream starting at starts[k].
    seg = lens + T + 1
    starts = np.cumsum(seg) - seg
    stream = np.zeros(int(seg.sum()), dtype=np.int64)
    char_word_start = np.repeat(starts + T, lens)                 # stream offset of char 0
    char_rank = np.arange(ids.size) - np.repeat(np.cumsum(lens) - lens, lens)
    stream[char_word_start + char_rank] = ids
    # One target per character plus the closing '.': stream positions starts+T .. starts+T+len.
    nt = lens + 1
    tpos = np.repeat(starts + T, nt) + (np.arange(int(nt.sum())) - np.repeat(np.cumsum(nt) - nt, nt))
    windows = np.lib.stride_tricks.sliding_window_view(stream, T + 1)
    xy = windows[tpos - T]                                         # copies (fancy indexing)
    X = torch.from_numpy(np.ascontiguousarray(xy[:, :T]))
    Y = torch.from_numpy(np.ascontiguousarray(xy[:, T]))
    return X, Y


# --------------------------------------------------------------------------- splits


@dataclass
class Split:
    """Word-level train/dev/test split, with how it was made (saved with every run)."""

    train: list[str]
    dev: list[str]
    test: list[str]
    method: str = "lecture"
    seed: int = LECTURE_SPLIT_SEED
    test_count: int | None = None
    dev_count: int | None = None

    def parts(self) -> dict[str, list[str]]:
        return {"train": self.train, "dev": self.dev, "test": self.test}

    def describe(self) -> str:
        return (f"split ({self.method}, seed {self.seed}): {len(self.train):,} train / "
                f"{len(self.dev):,} dev / {len(self.test):,} test words")

    def to_dict(self) -> dict:
        return {"method": self.method, "seed": self.seed, "test_count": self.test_count,
                "dev_count": self.dev_count, "train": list(self.train), "dev": list(self.dev),
                "test": list(self.test)}

    @classmethod
    def from_dict(cls, d: dict) -> "Split":
        try:
            return cls(train=list(d["train"]), dev=list(d["dev"]), test=list(d["test"]),
                       method=str(d["method"]), seed=int(d["seed"]),
                       test_count=d.get("test_count"), dev_count=d.get("dev_count"))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"not a saved split: missing or bad field {e}") from None


def split_words(words: Sequence[str], seed: int = LECTURE_SPLIT_SEED,
                test_count: int | None = None, dev_count: int | None = None) -> Split:
    """Shuffle the words like the lecture and cut them into train/dev/test.

    The shuffle is ``random.seed(seed); random.shuffle(words)`` done on a private
    ``random.Random(seed)`` (the same permutation, without touching the global RNG).

    * Default (``test_count=None``): the lecture's cut, ``n1 = int(0.8 * n)``,
      ``n2 = int(0.9 * n)``: train ``[:n1]``, dev ``[n1:n2]``, test ``[n2:]``.
    * ``test_count=K``: a fixed-size test set that does not grow with the corpus (as in
      makemore.py): test is the last K shuffled words, dev the ``dev_count`` (default K)
      words before them, train the rest. Useful to compare corpora of different sizes.
    """
    shuffled = list(words)
    random.Random(seed).shuffle(shuffled)
    n = len(shuffled)
    if test_count is None:
        if dev_count is not None:
            raise ValueError("dev_count needs test_count (the lecture split is 80/10/10)")
        n1, n2 = int(0.8 * n), int(0.9 * n)
        return Split(shuffled[:n1], shuffled[n1:n2], shuffled[n2:], "lecture", seed)
    k_test = int(test_count)
    k_dev = k_test if dev_count is None else int(dev_count)
    if k_test < 0 or k_dev < 0:
        raise ValueError("test_count and dev_count must be >= 0")
    if k_test + k_dev >= n:
        raise ValueError(f"test_count {k_test} + dev_count {k_dev} leave no training words "
                         f"out of {n}")
    n1, n2 = n - k_test - k_dev, n - k_test
    return Split(shuffled[:n1], shuffled[n1:n2], shuffled[n2:], "count", seed, k_test, k_dev)
