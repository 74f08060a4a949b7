"""charmlp.data: word lists, character policy, vocabulary, examples, splits."""

from __future__ import annotations

import json
import random
import unicodedata

import pytest
import torch

from charmlp.data import (
    DataError,
    Split,
    Vocab,
    VocabError,
    build_examples,
    embedded_corpus,
    load_corpus,
    normalize_word,
    read_words,
    split_words,
)

from _train_util import NAMES_TXT, notebook_examples, write_words

needs_names = pytest.mark.skipif(not NAMES_TXT.exists(), reason=f"{NAMES_TXT} not present")


# --------------------------------------------------------------------------- the lecture's data


@needs_names
def test_names_txt_sizes_match_the_lecture():
    words = read_words(NAMES_TXT)
    assert len(words) == 32_033
    vocab = Vocab.from_words(words)
    assert vocab.itos == ["."] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    X, Y = build_examples(words, vocab, 3)
    assert X.shape == (228_146, 3) and Y.shape == (228_146,)
    assert X.dtype == Y.dtype == torch.int64


@needs_names
def test_names_txt_lecture_split_sizes():
    words = read_words(NAMES_TXT)
    vocab = Vocab.from_words(words)
    split = split_words(words)
    sizes = [build_examples(p, vocab, 3)[0].shape[0] for p in (split.train, split.dev, split.test)]
    assert sizes == [182_625, 22_655, 22_866]
    # The very same permutation as the lecture's random.seed(42); random.shuffle(words).
    state = random.getstate()
    try:
        random.seed(42)
        ref = list(words)
        random.shuffle(ref)
    finally:
        random.setstate(state)
    n1, n2 = int(0.8 * len(ref)), int(0.9 * len(ref))
    assert (split.train, split.dev, split.test) == (ref[:n1], ref[n1:n2], ref[n2:])


@needs_names
def test_names_txt_examples_equal_the_notebook_loop():
    words = read_words(NAMES_TXT)
    vocab = Vocab.from_words(words)
    X, Y = build_examples(words, vocab, 3)
    Xr, Yr = notebook_examples(words, vocab.stoi, 3)
    assert torch.equal(X, torch.tensor(Xr)) and torch.equal(Y, torch.tensor(Yr))


@pytest.mark.parametrize("block_size", [1, 2, 3, 5, 8])
def test_examples_equal_the_notebook_loop(block_size):
    words = ["a", "emma", "zoë", "x", "abcdefghijkl", "o'neil", "mary ann", "b"]
    vocab = Vocab.from_words(words)
    X, Y = build_examples(words, vocab, block_size)
    Xr, Yr = notebook_examples(words, vocab.stoi, block_size)
    assert X.tolist() == Xr and Y.tolist() == Yr
    assert X.shape == (sum(len(w) + 1 for w in words), block_size)


def test_examples_edge_cases():
    vocab = Vocab.from_words(["ab"])
    X, Y = build_examples([], vocab, 3)
    assert X.shape == (0, 3) and Y.shape == (0,)
    with pytest.raises(ValueError, match="block_size"):
        build_examples(["ab"], vocab, 0)


def test_examples_unknown_character_names_the_word():
    vocab = Vocab.from_words(["abc"])
    with pytest.raises(VocabError, match=r"'z'.*'abz'.*dev split"):
        build_examples(["ab", "abz", "c"], vocab, 3, source="dev split")


# --------------------------------------------------------------------------- vocabulary


def test_vocab_layout_and_round_trip():
    vocab = Vocab.from_words(["cab", "zoë", "bad"])
    assert vocab.itos == [".", "a", "b", "c", "d", "o", "z", "ë"]
    assert vocab.stoi["."] == 0 and vocab.size == len(vocab) == 8
    assert vocab.decode(vocab.encode("zoë")) == "zoë"
    d = json.loads(json.dumps(vocab.to_dict()))  # survives JSON (config.json) ...
    again = Vocab.from_dict(d)
    assert again == vocab and again.itos == vocab.itos and again.stoi == vocab.stoi
    X1, _ = build_examples(["cab", "zoë"], vocab, 3)
    X2, _ = build_examples(["cab", "zoë"], again, 3)
    assert torch.equal(X1, X2)


def test_vocab_unknown_character_is_a_clear_error():
    vocab = Vocab.from_words(["abc"])
    with pytest.raises(VocabError, match=r"'Q' \(U\+0051\) in 'aQ' is not in the vocabulary"):
        vocab.encode("aQ")


@pytest.mark.parametrize("bad", [{"chars": "ba"}, {"chars": "a.b"}, {"chars": "aab"}, {},
                                 {"chars": "ab", "start_end": "#"}, "abc"])
def test_vocab_from_bad_dict(bad):
    with pytest.raises(VocabError):
        Vocab.from_dict(bad)


# --------------------------------------------------------------------------- character policy


def test_character_policy(tmp_path, capsys):
    decomposed = unicodedata.normalize("NFD", "Zoë")
    assert decomposed != "Zoë"
    path = tmp_path / "w.txt"
    path.write_text(f"  Emma \n\n{decomposed}\nJean-Luc\nR2d2\nst. john\nbad\ttab\nmary ann\n\n",
                    encoding="utf-8")
    words = read_words(path)
    # Lower-cased, NFC-normalized, digits/hyphens/inner spaces kept; '.' and tabs rejected.
    assert words == ["emma", "zoë", "jean-luc", "r2d2", "mary ann"]
    err = capsys.readouterr().err
    assert "skipped 2 unusable line(s)" in err and "line 6" in err and "line 7" in err
    assert str(path) in err
    assert read_words(path, lowercase=False)[:2] == ["Emma", "Zoë"]
    vocab = Vocab.from_words(words)
    assert {"-", "2", " ", "ë"} <= set(vocab.itos)


def test_normalize_word_reasons():
    assert normalize_word("  Ann ") == ("ann", None)
    assert normalize_word("   ") == (None, None)
    assert normalize_word("a.b")[1].startswith("contains '.'")
    assert "U+200D" in normalize_word("a\u200db")[1]          # zero-width joiner
    assert "NO-BREAK SPACE" in normalize_word("a\u00a0b")[1]   # invisible in samples
    assert normalize_word("a b") == ("a b", None)               # a plain inner space is kept


def test_utf8_bom_is_ignored(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffanna\nbob\n".encode("utf-8"))
    assert read_words(path) == ["anna", "bob"]


# --------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="nope.txt: no such file"):
        read_words(path)


def test_directory(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        read_words(tmp_path)


def test_empty_and_blank_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.txt: is empty"):
        read_words(empty)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\t\n")
    with pytest.raises(DataError, match="blank.txt: contains no words"):
        read_words(blank)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("anna\nzoë\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt: is not UTF-8"):
        read_words(path)


def test_no_usable_words(tmp_path):
    path = write_words(tmp_path / "dots.txt", ["a.b", "c.d"])
    with pytest.raises(DataError, match=r"dots.txt: no usable words: all 2 .*line 1: 'a.b'"):
        read_words(path)


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root can read any file")
def test_unreadable_file(tmp_path):  # pragma: no cover - CI runs as root
    path = write_words(tmp_path / "secret.txt", ["ann"])
    path.chmod(0)
    with pytest.raises(DataError, match="secret.txt: cannot read"):
        read_words(path)


# --------------------------------------------------------------------------- splits


def test_split_is_deterministic_and_leaves_global_rng_alone():
    words = [f"w{i}" for i in range(1000)]
    state = random.getstate()
    a, b = split_words(words), split_words(words)
    assert random.getstate() == state
    assert a.parts() == b.parts()
    assert (len(a.train), len(a.dev), len(a.test)) == (800, 100, 100)
    assert sorted(a.train + a.dev + a.test) == sorted(words)
    c = split_words(words, seed=7)
    assert c.train != a.train
    assert Split.from_dict(json.loads(json.dumps(a.to_dict()))).parts() == a.parts()


def test_fixed_count_split():
    words = [f"w{i}" for i in range(1000)]
    s = split_words(words, test_count=50)
    assert (len(s.train), len(s.dev), len(s.test)) == (900, 50, 50)
    assert s.method == "count" and s.test_count == 50 and s.dev_count == 50
    s2 = split_words(words, test_count=50, dev_count=0)
    assert (len(s2.train), len(s2.dev), len(s2.test)) == (950, 0, 50)
    # Same shuffle as the lecture split: the test words are the last 50 shuffled words.
    assert s.test == split_words(words).test[-50:]
    with pytest.raises(ValueError, match="leave no training words"):
        split_words(words, test_count=600)
    with pytest.raises(ValueError, match="needs test_count"):
        split_words(words, dev_count=5)


# --------------------------------------------------------------------------- corpora


def test_embedded_corpus():
    corpus = embedded_corpus()
    assert len(corpus.words) == 5_163 == len(set(corpus.words))
    assert all(w == w.lower() and w.isalpha() for w in corpus.words)
    assert corpus.words[:3] == ["james", "john", "robert"]
    assert corpus.describe().endswith("5,163 words") and "names" in corpus.describe()
    assert load_corpus(None).words == corpus.words


def test_load_corpus_from_file(tmp_path):
    path = write_words(tmp_path / "w.txt", ["Ann", "bob"])
    corpus = load_corpus(path)
    assert corpus.words == ["ann", "bob"]
    assert corpus.describe() == f"{path}: 2 words"
    assert corpus.to_dict()["num_words"] == 2
