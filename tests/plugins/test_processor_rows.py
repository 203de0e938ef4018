"""The built-in ``logits_processors`` row by row: a draft row gets what its context gets, every processor
at once against HF's processor classes, nothing done for requests that ask for nothing, ``min_p`` against
HF's warper, and the ``SamplingParams`` checks."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import MinPLogitsWarper
from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor, NoBadWordsLogitsProcessor,
                                                    RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor)

from tests.plugins.test_processors import OpenAIPenalties
from tokenmill import SamplingParams
from tokenmill.hooktypes import VerifyInput
from tokenmill.plugins.sampling.processor_state import bad_word_sequences
from tokenmill.plugins.sampling.processors import LogitsProcessors
from tokenmill.sampling import filtered_probs
from tokenmill.sequence import Sequence


# ----------------------------------------------------------------------------------------- draft rows
def processor(eos=(2,), tokenizer=None) -> LogitsProcessors:
    plugin = LogitsProcessors()
    plugin.configure(context=SimpleNamespace(tokenizer=tokenizer, eos_token_ids=frozenset(eos)))
    return plugin


@pytest.mark.parametrize("parents", [None, [-1, 0, 1, -1, 3]], ids=["chain", "tree"])
def test_a_draft_row_is_processed_as_its_context(parents):
    """Row ``k`` of a drafted sequence gets exactly what the sequence extended by ``follows(i, k)`` gets."""
    params = SamplingParams(repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.7, min_tokens=4,
                            logit_bias={3: 2.0, 5: -1.0}, bad_words_ids=[[7], [10, 11], [11, 12, 13]],
                            stop_token_ids=[9])
    prompt, output, drafts = [4, 10, 6, 4], [11, 12], [13, 10, 11, 12, 5]
    if parents is None:
        drafts = drafts[:4]
    seqs = [Sequence(0, "a", prompt, params, 0.0, token_ids=prompt + output),
            Sequence(1, "b", [1, 2], SamplingParams(), 0.0)]  # asks for nothing: left as it is
    rows = 1 + len(drafts) + 1
    logits = torch.randn(rows, 16, generator=torch.Generator().manual_seed(0)) * 3
    batch = VerifyInput(seqs, logits.clone(), [0, rows - 1], [drafts, []], [parents, None] if parents else [])
    processor().process_logits(batch=batch)
    assert torch.equal(batch.logits[-1], logits[-1])
    for k in range(1 + len(drafts)):  # stop id 9 and EOS 2 while fewer than 4 tokens are generated
        generated = len(output) + len(batch.follows(0, k))
        assert bool(torch.isinf(batch.logits[k, [2, 9]]).all()) == (generated < 4)
        alone = Sequence(10 + k, "x", prompt, params, 0.0, token_ids=prompt + output + batch.follows(0, k))
        one = VerifyInput([alone], logits[k:k + 1].clone(), [0], [[]])
        processor().process_logits(batch=one)
        assert torch.equal(batch.logits[k], one.logits[0]), k  # bit for bit: speculation stays exact
    assert torch.isinf(batch.logits[:-1, 7]).all() and not torch.isinf(batch.logits[-1]).any()


def test_one_row_matches_hfs_processors_chained():
    """Every processor at once on one row, against HF's own processor classes applied in the same order."""
    prompt, output = [4, 10, 6, 4, 3, 11], [11, 12, 4, 12, 6]
    params = SamplingParams(repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.7, min_tokens=6,
                            logit_bias={3: 2.0, 5: -1.0, 12: 0.5}, bad_words_ids=[[7], [12, 6], [4, 12, 6, 13]],
                            stop_token_ids=[9])
    logits = torch.randn(1, 16, generator=torch.Generator().manual_seed(1)) * 3
    batch = VerifyInput([Sequence(0, "a", prompt, params, 0.0, token_ids=prompt + output)], logits.clone(), [0],
                        [[]])
    processor().process_logits(batch=batch)
    ids = torch.tensor([prompt + output])
    ref = logits.clone()
    for hf_processor in (SequenceBiasLogitsProcessor({(t,): b for t, b in params.logit_bias.items()}),
                         RepetitionPenaltyLogitsProcessor(1.7), OpenAIPenalties(len(prompt), 0.5, 0.7),
                         NoBadWordsLogitsProcessor(params.bad_words_ids),
                         MinNewTokensLengthLogitsProcessor(len(prompt), 6, [2, 9])):
        ref = hf_processor(ids, ref)
    torch.testing.assert_close(batch.logits, ref)
    assert torch.isinf(ref[0, [2, 7, 9, 13]]).all() and torch.isfinite(ref[0, [3, 4, 5, 6, 10, 11, 12]]).all()


def test_requests_that_ask_for_nothing_cost_no_state():
    plugin = processor()
    seqs = [Sequence(i, str(i), [1, 2, 3], SamplingParams(), 0.0) for i in range(3)]
    logits = torch.randn(3, 8)
    batch = VerifyInput(seqs, logits.clone(), [0, 1, 2], [[], [], []])
    for seq in seqs:
        plugin.check_request(seq=seq)
    plugin.process_logits(batch=batch)
    assert torch.equal(batch.logits, logits) and not plugin.requests


# ----------------------------------------------------------------------------------------- min_p
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
@pytest.mark.parametrize("min_p", [0.02, 0.1, 0.5])
def test_min_p_matches_hf_warper(temperature, min_p):
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(3)) * 4
    ours = filtered_probs(logits, SamplingParams(temperature=temperature, min_p=min_p))
    theirs = torch.softmax(MinPLogitsWarper(min_p)(None, logits / temperature), dim=-1)
    torch.testing.assert_close(ours, theirs)
    assert ((ours == 0).sum(-1) > 0).all()  # the filter really removed tokens


# ----------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("fields, field", [
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"logit_bias": {5: 101}}, r"logit_bias\[5\]"), ({"logit_bias": {-1: 1.0}}, "logit_bias keys"),
    ({"logit_bias": [1, 2]}, "logit_bias"), ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 1.5}, "min_tokens"),
    ({"bad_words": [""]}, "bad_words"), ({"bad_words_ids": [[]]}, "bad_words_ids"),
    ({"bad_words_ids": [[1, -2]]}, "bad_words_ids"), ({"min_p": 1.5}, "min_p"), ({"min_p": -0.1}, "min_p"),
])
def test_bad_values_are_refused(fields, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**fields)




class Words:
    """A tokenizer of whole words: each distinct space-separated word (a leading space kept) is one id."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        pieces = [p for p in text.replace(" ", "\0 ").split("\0") if p.strip()]
        return [self.vocab.setdefault(p, len(self.vocab)) for p in pieces]


def test_bad_words_are_banned_with_and_without_a_leading_space():
    tok = Words()
    found = bad_word_sequences(tok, ["red fox", " red fox", "dog"])
    assert found == [(tok.vocab["red"], tok.vocab[" fox"]), (tok.vocab[" red"], tok.vocab[" fox"]),
                     (tok.vocab["dog"],), (tok.vocab[" dog"],)]
    with pytest.raises(ValueError, match="bad_words entry '   ' tokenizes to no tokens"):
        bad_word_sequences(tok, ["dog", "   "])
