"""``tokenmill.sampling``: the greedy token of each row."""
import pytest
import torch

from tokenmill.sampling import greedy_tokens


@pytest.mark.parametrize("vocab", [49152, 151936, 32064, 1000, 96])
def test_greedy_tokens_are_argmax_first_maximum_included(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(9, vocab, generator=g)
    logits[1] = float("-inf")                                  # all -inf: token 0, like argmax
    logits[2, vocab // 3] = logits[2, vocab - 1] = 50.0        # a tie across blocks: the first
    logits[3, 33] = logits[3, 34] = 50.0                       # a tie inside a block: the first
    logits[4, vocab - 1] = 50.0                                # the last token
    logits[5, vocab // 2] = float("nan")                       # NaN counts as the maximum, as in argmax
    logits[6, vocab - 2] = logits[6, 3] = float("nan")
    logits[7] = 0.0
    half = logits.to(torch.bfloat16)
    assert greedy_tokens(logits) == logits.argmax(-1).tolist()
    assert greedy_tokens(half) == half.argmax(-1).tolist()
    assert greedy_tokens(logits[:, : vocab - 1]) == logits[:, : vocab - 1].argmax(-1).tolist()  # not contiguous


def test_greedy_tokens_of_one_row_and_of_none():
    row = torch.zeros(1, 4096)
    row[0, 4000] = 1.0
    assert greedy_tokens(row) == [4000]
    assert greedy_tokens(torch.zeros(0, 4096)) == []
