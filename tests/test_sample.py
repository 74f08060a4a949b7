"""charmlp.sample: determinism, the notebook's procedure, temperature/top-k, marks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from charmlp import reference
from charmlp.data import Vocab, VocabError
from charmlp.model import MLPLanguageModel
from charmlp.sample import DEFAULT_SAMPLE_SEED, format_samples, sample_words

VOCAB = Vocab([chr(c) for c in range(ord("a"), ord("z") + 1)])


def _model(fused=True, block_size=3):
    return MLPLanguageModel(vocab_size=27, block_size=block_size, emb_dim=10, hidden=200,
                            fused=fused, init="notebook")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_same_seed_same_words():
    m = _model()
    a = sample_words(m, VOCAB, 20, _gen(5))
    b = sample_words(m, VOCAB, 20, _gen(5))
    c = sample_words(m, VOCAB, 20, _gen(6))
    assert [s.word for s in a] == [s.word for s in b]
    assert [s.word for s in a] != [s.word for s in c]
    assert len(a) == 20


def test_equals_the_notebook_sampling_loop():
    """Temperature 1, no top-k: exactly the lecture's loop (same generator, same draws)."""
    m = _model(fused=False)
    with torch.no_grad():  # untrained: make '.' likely so that words end (as after training)
        m.head.bias[0] += 8.0
    params = [p.detach() for p in (m.embed.table, m.embed.weight, m.embed.bias, m.head.weight, m.head.bias)]
    g = torch.Generator().manual_seed(2147483647 + 10)
    expected = []
    with torch.no_grad():
        for _ in range(20):
            out = []
            context = [0] * 3
            while True:
                logits = reference.mlp_logits(torch.tensor([context]), *params)
                probs = F.softmax(logits, dim=1)
                ix = torch.multinomial(probs, num_samples=1, generator=g).item()
                context = context[1:] + [ix]
                out.append(ix)
                if ix == 0 or len(out) > 1000:
                    break
            expected.append("".join(VOCAB.itos[i] for i in out[:-1]))
    got = sample_words(m, VOCAB, 20, max_len=1000)  # default generator: the notebook's seed
    assert DEFAULT_SAMPLE_SEED == 2147483647 + 10
    assert [s.word for s in got] == expected
    assert 2 < sum(map(len, expected)) / 20 < 30
    # The fused path draws the same words (its logits agree to float rounding).
    m.fused = True
    assert [s.word for s in sample_words(m, VOCAB, 20, max_len=1000)] == expected


def test_top_k_and_temperature():
    m = _model()
    greedy = [s.word for s in sample_words(m, VOCAB, 5, _gen(1), top_k=1)]
    assert len(set(greedy)) == 1  # top-1 is deterministic: every word the same
    assert greedy == [s.word for s in sample_words(m, VOCAB, 5, _gen(2), top_k=1)]
    cold = [s.word for s in sample_words(m, VOCAB, 5, _gen(3), temperature=1e-4)]
    assert cold == greedy
    k3 = sample_words(m, VOCAB, 30, _gen(4), top_k=3)
    assert len({s.word for s in k3}) > 1


def test_marks_training_words_and_formats():
    m = _model()
    words = [s.word for s in sample_words(m, VOCAB, 6, _gen(7))]
    marked = sample_words(m, VOCAB, 6, _gen(7), train_words=words[:2])
    assert [s.in_train for s in marked[:2]] == [True, True]
    assert all(s.in_train == (s.word in words[:2]) for s in marked)
    text = format_samples(marked)
    assert f"* {words[0]}" in text and "of 6 marked * occur in the training words" in text


def test_prefix():
    m = _model()
    samples = sample_words(m, VOCAB, 10, _gen(8), prefix="ma")
    assert all(s.word.startswith("ma") for s in samples)
    with pytest.raises(VocabError, match="'É'"):
        sample_words(m, VOCAB, 1, _gen(8), prefix="É")


def test_max_len_cuts_words_that_never_end():
    m = _model()
    with torch.no_grad():
        m.head.bias[0] = -1e4  # '.' never drawn
    s = sample_words(m, VOCAB, 2, _gen(9), max_len=12)
    assert all(len(x.word) == 12 and x.truncated for x in s)
    assert "cut at max length" in format_samples(s)


@pytest.mark.parametrize("kw", [dict(n=-1), dict(temperature=0.0), dict(top_k=0), dict(max_len=0)])
def test_bad_options(kw):
    args = dict(n=1)
    args.update(kw)
    n = args.pop("n")
    with pytest.raises(ValueError):
        sample_words(_model(), VOCAB, n, _gen(0), **args)
