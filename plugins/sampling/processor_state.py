"""What the built-in logits processors keep for one request: its banned sequences, its bias tensors, and
the token counts of its context, folded in as the request grows (never recounted from the start)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from tokenmill.errors import RequestError
from tokenmill.params import SamplingParams
from tokenmill.sequence import Sequence

_EMPTY = torch.empty(0, dtype=torch.long)


def bad_word_sequences(tokenizer, words: list[str]) -> list[tuple[int, ...]]:
    """The token-id sequences ``bad_words`` bans: each word tokenized as it is and after a leading space
    (with no special tokens), so it is banned at the start of the text and in the middle of it.

    :raises RequestError: (a ValueError) a word that tokenizes to nothing either way, naming it and the field.
    """
    out: dict[tuple[int, ...], None] = {}
    for word in words:
        bare = word[1:] if word.startswith(" ") else word
        found = [tuple(tokenizer.encode(text, add_special_tokens=False)) for text in (bare, " " + bare) if text]
        found = [ids for ids in found if ids]
        if not found:
            raise RequestError(f"bad_words entry {word!r} tokenizes to no tokens, so it cannot be banned; "
                               "give words that are text of this model's vocabulary", field="bad_words")
        out.update(dict.fromkeys(found))
    return list(out)


@dataclass(slots=True)
class BanTable:
    """Banned token sequences (HF ``NoBadWordsLogitsProcessor``): a one-token sequence bans its token always;
    a longer one bans its last token when the context ends with the tokens before it."""

    always: list[int]
    by_prefix: dict[int, dict[tuple[int, ...], list[int]]]  # prefix length -> prefix -> last tokens
    longest_prefix: int

    @classmethod
    def build(cls, sequences: list[tuple[int, ...]]) -> "BanTable":
        always: dict[int, None] = {}
        by_prefix: dict[int, dict[tuple[int, ...], list[int]]] = {}
        for ids in sequences:
            if len(ids) == 1:
                always[ids[0]] = None
            else:
                by_prefix.setdefault(len(ids) - 1, {}).setdefault(tuple(ids[:-1]), []).append(ids[-1])
        return cls(list(always), by_prefix, max(by_prefix, default=0))

    def banned(self, token_ids: list[int], follows: list[int]) -> list[int]:
        """The tokens banned after ``token_ids + follows`` (only the last ``longest_prefix`` tokens are read)."""
        out = list(self.always)
        if self.by_prefix:
            m = self.longest_prefix
            tail = token_ids[-m:] + follows if len(follows) < m else follows
            for n, table in self.by_prefix.items():
                if len(tail) >= n:
                    out.extend(table.get(tuple(tail[-n:]), ()))
        return out


@dataclass(slots=True)
class RequestState:
    """One request's processor state. :meth:`catch_up` folds in the tokens appended since the last step."""

    bans: BanTable | None                  # bad_words (tokenized) and bad_words_ids; None for none
    bias_ids: torch.Tensor                 # logit_bias as two aligned tensors
    bias_values: torch.Tensor
    stop_ids: list[int]                    # banned while fewer than min_tokens tokens are generated
    seen: int = 0                          # leading tokens of seq.token_ids folded in below
    context: dict[int, None] = field(default_factory=dict)  # distinct prompt + output tokens (repetition)
    context_ids: torch.Tensor = _EMPTY     # the same, as a tensor (extended, never rebuilt)
    output: Counter = field(default_factory=Counter)         # generated token -> count (presence, frequency)
    output_ids: torch.Tensor = _EMPTY      # output's keys and their penalty (presence + frequency * count)
    output_penalty: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    @classmethod
    def build(cls, params: SamplingParams, tokenizer, eos_token_ids: frozenset[int]) -> "RequestState":
        sequences = [tuple(w) for w in params.bad_words_ids]
        if params.bad_words:
            sequences += bad_word_sequences(tokenizer, params.bad_words)
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        return cls(BanTable.build(sequences) if sequences else None,
                   torch.tensor(list(params.logit_bias), dtype=torch.long),
                   torch.tensor(list(params.logit_bias.values()), dtype=torch.float32),
                   sorted(stop) if params.min_tokens else [])

    def catch_up(self, seq: Sequence) -> None:
        """Fold ``seq``'s tokens since the last call into the counts the request's penalties read."""
        params = seq.params
        new = seq.token_ids[self.seen:]
        if not new:
            return
        start, prompt_len = self.seen, seq.prompt_len
        self.seen = len(seq.token_ids)
        if params.repetition_penalty != 1.0:
            fresh = [t for t in dict.fromkeys(new) if t not in self.context]
            if fresh:
                self.context.update(dict.fromkeys(fresh))
                self.context_ids = torch.cat([self.context_ids, torch.tensor(fresh, dtype=torch.long)])
        if params.presence_penalty or params.frequency_penalty:
            generated = new[max(0, prompt_len - start):]
            if generated:
                self.output.update(generated)
                self.output_ids, self.output_penalty = penalties(self.output, params)

    def penalties(self, params: SamplingParams, follows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and their presence + frequency penalty after the output and then ``follows`` (one entry
        per distinct token, computed as for a sequence whose output ends with ``follows``)."""
        if not follows:
            return self.output_ids, self.output_penalty
        counts = self.output.copy()
        counts.update(follows)
        return penalties(counts, params)


def penalties(counts: Counter, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """``presence * (count > 0) + frequency * count`` for each token of ``counts``: (ids, penalties)."""
    values = torch.tensor(list(counts.values()), dtype=torch.float32)
    return (torch.tensor(list(counts), dtype=torch.long),
            params.presence_penalty + params.frequency_penalty * values)
