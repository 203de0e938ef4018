"""``medusa``: extra decoding heads on the last hidden state propose the next tokens (Medusa-1).

Head ``k`` is ``k_layers`` residual blocks ``x + SiLU(W x + b)`` (``W`` zero-initialised, so an untrained
head starts as the base model's own next-token prediction) followed by the base model's LM head (shared,
frozen; restricted to the heads' draft vocabulary when they were trained with one). Reading the hidden state
the engine hands drafters (``propose_tokens``' ``hidden``: the target's final state at the last accepted token
``p``, whose logits gave token ``p+1``) and, for heads trained with
``token_input``, the embedding of token ``p+1`` (the decode token, known when drafting), head ``k`` predicts
token ``p+2+k``. Training: :mod:`tokenmill.plugins.speculative.medusa_train` (``tokenmill train-medusa``).
Drafts form a candidate tree (``tree``: paths of top-k ranks, e.g. ``[0, 1]`` = head 0's best token followed
by head 1's second best; or ``tree_size``: the best paths by the heads' measured accuracy) verified by the
target in one forward under a tree attention mask, together with the regular decode token; without either a
chain of each head's top-1 token.

Acceptance: ``exact`` leaves verification to the default sampler (greedy prefix match, or exact
speculative sampling with the heads' drafts treated as deterministic); ``typical`` accepts a draft ``x``
when ``p(x) > min(epsilon, delta * exp(-H(p)))`` (Medusa's typical acceptance, in
:mod:`tokenmill.speculation.accept`; faster at temperature > 0, but it does not preserve the sampling law
exactly). Greedy requests always use exact matching.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tokenmill.errors import PipelineError
from tokenmill.hooktypes import PipelineContext, VerifyInput
from tokenmill.options import FilePath, describe_path
from tokenmill.plugin import hookimpl
from tokenmill.plugins.speculative.base import DrafterPlugin
from tokenmill.speculation import Draft, typical_accept, typical_accept_tree, verify_drafts, verify_tree
from tokenmill.sequence import Sequence

WEIGHTS = "medusa_heads.safetensors"
CONFIG = "medusa_config.json"
VOCAB = "draft_vocab"  # optional tensor in WEIGHTS: the token ids the heads score
MAX_RANK = 16  # deepest top-k rank a tree may name


class ResBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """``num_heads`` heads of ``num_layers`` residual blocks. With ``token_input`` each head also reads the
    embedding of the token the state's own logits produced (known when drafting: it is the decode token),
    added through a zero-initialised projection: ``x = h + P_k e``."""

    def __init__(self, hidden: int, num_heads: int, num_layers: int = 1, token_input: bool = False) -> None:
        super().__init__()
        self.hidden, self.num_heads, self.num_layers = hidden, num_heads, num_layers
        self.token_input = token_input
        self.heads = nn.ModuleList(nn.Sequential(*[ResBlock(hidden) for _ in range(num_layers)])
                                   for _ in range(num_heads))
        self.token_proj = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(num_heads)) \
            if token_input else None
        for proj in self.token_proj or ():
            nn.init.zeros_(proj.weight)

    def forward(self, h: torch.Tensor, e: torch.Tensor | None = None, num: int | None = None) -> torch.Tensor:
        """``[..., hidden]`` (and the next tokens' embeddings ``e``, same shape, with ``token_input``) ->
        ``[num, ..., hidden]`` for the first ``num`` heads (all by default), to be projected by the LM head."""
        assert (e is not None) == self.token_input, "token_input heads need the next tokens' embeddings"
        heads = self.heads[:num]
        if e is None:
            return torch.stack([head(h) for head in heads])
        return torch.stack([head(h + proj(e)) for head, proj in zip(heads, self.token_proj)])

    def save(self, out: Path, meta: dict, vocab: torch.Tensor | None = None) -> None:
        """Weights and config; ``vocab``: the token ids the heads score (the draft vocabulary; None: all)."""
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.state_dict().items()}
        if vocab is not None:
            tensors[VOCAB] = vocab.to(torch.int64).contiguous()
        save_file(tensors, str(out / WEIGHTS))
        (out / CONFIG).write_text(json.dumps(dict(meta, hidden_size=self.hidden, num_heads=self.num_heads,
                                                  num_layers=self.num_layers, token_input=self.token_input),
                                             indent=2))

    @classmethod
    def load(cls, path: str | Path, *, hidden_size: int,
             vocab_size: int) -> tuple["MedusaHeads", dict, torch.Tensor | None]:
        from safetensors.torch import load_file

        shown, path = describe_path(path), Path(path).expanduser()
        cfg_file, weights = path / CONFIG, path / WEIGHTS
        if not cfg_file.is_file() or not weights.is_file():
            raise PipelineError(f"medusa heads not found in {shown} (need {CONFIG} and {WEIGHTS}); train them with "
                                "`tokenmill train-medusa PIPELINE --out DIR`")
        cfg = json.loads(cfg_file.read_text())
        if cfg["hidden_size"] != hidden_size or cfg.get("vocab_size", vocab_size) != vocab_size:
            raise PipelineError(f"medusa heads in {path} were trained for hidden size {cfg['hidden_size']} / vocab "
                                f"{cfg.get('vocab_size')}, but the model has {hidden_size} / {vocab_size}")
        heads = cls(cfg["hidden_size"], cfg["num_heads"], cfg["num_layers"], cfg.get("token_input", False))
        tensors = load_file(str(weights))
        vocab = tensors.pop(VOCAB, None)
        if vocab is not None and (vocab.ndim != 1 or not len(vocab) or int(vocab.min()) < 0
                                  or int(vocab.max()) >= vocab_size):
            raise PipelineError(f"medusa heads in {shown}: the draft vocabulary must be token ids below {vocab_size}")
        heads.load_state_dict(tensors)
        return heads.eval().requires_grad_(False), cfg, vocab


def tree_layout(paths: list[list[int]], num_heads: int) -> tuple[list[tuple[int, ...]], list[int]]:
    """Validate a candidate tree given as rank paths; -> (paths ordered parents first, parent index of each)."""
    nodes = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))
    for p in nodes:
        if not p or len(p) > num_heads or any(not 0 <= r < MAX_RANK for r in p):
            raise ValueError(f"tree path {list(p)}: need 1..{num_heads} ranks (one per head), each in "
                             f"0..{MAX_RANK - 1}")
        if len(p) > 1 and p[:-1] not in nodes:
            raise ValueError(f"tree path {list(p)} has no parent path {list(p[:-1])} in the tree")
    index = {p: i for i, p in enumerate(nodes)}
    return nodes, [index[p[:-1]] if len(p) > 1 else -1 for p in nodes]


def best_tree(accuracy: list[list[float]], size: int) -> list[list[int]]:
    """The ``size`` rank paths of highest expected acceptance, ``accuracy[k][r]`` being how often head ``k``'s
    rank-``r`` token is right (measured on held-out text at training): a path's value is the product of its
    ranks' accuracies (heads taken as independent, as Medusa does), so a child never outranks its parent and
    the best ``size`` paths form a tree. Its expected accepted drafts per step is the sum of their values."""
    import heapq

    ranks = min(MAX_RANK, min(len(a) for a in accuracy))
    heap = [(-accuracy[0][r], (r,)) for r in range(ranks)]
    heapq.heapify(heap)
    out: list[list[int]] = []
    while heap and len(out) < size:
        value, path = heapq.heappop(heap)
        out.append(list(path))
        if len(path) < len(accuracy):
            for r in range(ranks):
                heapq.heappush(heap, (value * accuracy[len(path)][r], path + (r,)))
    return out


class Medusa(DrafterPlugin):
    """Medusa decoding heads (see the module docstring)."""

    name = "medusa"

    @dataclass(slots=True)
    class Options(DrafterPlugin.Options):
        heads: FilePath = ""            # directory written by `tokenmill train-medusa`
        acceptance: str = "exact"       # exact | typical
        typical_epsilon: float = 0.09
        typical_delta: float = 0.3
        tree: list[list[int]] | None = None  # candidate paths of top-k ranks; None: see tree_size
        tree_size: int | None = None    # with no `tree`: the best tree of this many candidates, from the heads'
                                        # held-out accuracy per rank; neither: a chain of top-1 tokens

        def __post_init__(self) -> None:
            DrafterPlugin.Options.__post_init__(self)
            if self.tree is not None:
                if not self.tree or not all(isinstance(p, list) and all(isinstance(r, int) for r in p)
                                            for p in self.tree):
                    raise ValueError(f"tree must be a non-empty list of rank paths like [[0], [1], [0, 0]], "
                                     f"got {self.tree!r}")
                tree_layout(self.tree, 16)
            if self.tree_size is not None and (not isinstance(self.tree_size, int) or self.tree_size < 1
                                               or self.tree is not None):
                raise ValueError(f"tree_size must be an integer >= 1 and cannot be given together with tree, got "
                                 f"{self.tree_size!r}")
            if not self.heads:
                raise ValueError("heads must name a directory of trained heads (tokenmill train-medusa)")
            if self.acceptance not in ("exact", "typical"):
                raise ValueError(f"acceptance must be 'exact' or 'typical', got {self.acceptance!r}")

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.heads: MedusaHeads | None = None
        self.lm_head = self.embed = None

    @hookimpl
    def configure(self, context: PipelineContext) -> None:
        if context.tensor_parallel_size > 1:
            raise PipelineError(f"medusa cannot run with tensor_parallel_size {context.tensor_parallel_size}: its "
                                "heads project through the target's LM head, of which this rank holds a slice; "
                                "use prompt_lookup or a separate draft model")
        cfg = context.model.config
        path = self.options.heads
        self.heads, meta, vocab = MedusaHeads.load(path, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size)
        self.heads.to(device=context.device, dtype=context.dtype)
        self.lm_head = context.model.lm_head
        self.vocab = None
        weight = getattr(self.lm_head, "weight", None)
        if vocab is not None and isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point:
            # score only the draft vocabulary: the LM head's rows of those tokens (a quantized LM head: all)
            self.vocab = vocab.to(context.device)
            rows = weight.detach().index_select(0, self.vocab).to(context.dtype)
            self.lm_head = lambda x: x @ rows.T
        self.embed = context.model.get_input_embeddings()
        self.k = min(self.options.num_speculative_tokens, self.heads.num_heads)
        self.tree = None
        paths = self.options.tree
        if self.options.tree_size is not None:
            if "heldout_rank_accuracy" not in meta:
                raise PipelineError(f"medusa tree_size needs heads trained with their held-out accuracy per rank "
                                    f"(the config in {path} has none): retrain them or give `tree` explicitly")
            paths = best_tree(meta["heldout_rank_accuracy"][: self.heads.num_heads], self.options.tree_size)
        if paths is not None:
            try:
                self.tree = tree_layout(paths, self.heads.num_heads)
            except ValueError as exc:
                raise PipelineError(f"medusa tree: {exc} (the heads in {path} are {self.heads.num_heads})") from exc
            self.k = max(len(p) for p in self.tree[0])
            self.ranks = max(r for p in self.tree[0] for r in p) + 1
        if self.options.adaptive:  # the planner starts from the heads' measured cost at a small and a large batch
            for batch in (1, 64):
                self.draft_cost.observe(batch, self.k, self._time_heads(batch, cfg.hidden_size, context))
        self.calibrate(context)

    @torch.inference_mode()
    def _time_heads(self, batch: int, hidden_size: int, context: PipelineContext) -> float:
        """Seconds the heads and their scoring take for ``batch`` states (the second of two runs)."""
        h = torch.zeros(batch, hidden_size, device=context.device, dtype=context.dtype)
        for _ in range(2):
            t0 = time.perf_counter()
            self.lm_head(self.heads(h, h if self.heads.token_input else None, self.k)).argmax(-1).tolist()
        return time.perf_counter() - t0

    def draft_widths(self) -> list[int]:
        if self.tree is None:
            return [1] * self.k
        return [sum(len(p) == d for p in self.tree[0]) for d in range(1, self.k + 1)]

    @torch.inference_mode()
    def draft(self, seqs: list[Sequence], depth: int, *, hidden: list, kv) -> list:
        ready = [i for i, h in enumerate(hidden) if h is not None]
        out: list[list[int]] = [[] for _ in seqs]
        if not ready:
            return out
        h = torch.stack([hidden[i] for i in ready])
        e = None
        if self.heads.token_input:  # the token the state's logits gave: the decode token, not yet computed
            e = self.embed(torch.tensor([seqs[i].token_ids[-1] for i in ready], device=h.device)).to(h.dtype)
        logits = self.lm_head(self.heads(h, e, self.k))             # [k, B, vocab or draft vocab]
        if self.tree is None:
            best = self._ids(logits.argmax(-1)).T.tolist()           # [B, k]
            for j, i in enumerate(ready):
                out[i] = best[j]
            return out
        top = self._ids(logits.topk(self.ranks, dim=-1).indices).permute(1, 0, 2).tolist()  # [B, k, ranks]
        paths, parents = self.tree
        for j, i in enumerate(ready):
            out[i] = Draft([top[j][len(p) - 1][p[-1]] for p in paths], parents=parents)
        return out

    def _ids(self, index: torch.Tensor) -> torch.Tensor:
        return index if self.vocab is None else self.vocab[index]

    @hookimpl
    def verify_tokens(self, batch: VerifyInput):
        if self.options.acceptance != "typical" or not any(batch.drafts):
            return None  # the default sampler verifies exactly
        out = []
        for i, seq in enumerate(batch.seqs):
            d = batch.drafts[i]
            rows = batch.logits[batch.row_start[i]:batch.row_start[i] + 1 + len(d)]
            tree = batch.tree(i)
            where = (seq.seed, seq.num_tokens)
            if tree is not None:
                out.append(verify_tree(rows, d, tree, seq.params, *where) if seq.params.greedy else
                           typical_accept_tree(rows, d, tree, seq.params, *where,
                                               self.options.typical_epsilon, self.options.typical_delta))
            elif seq.params.greedy:
                out.append(verify_drafts(rows, d, seq.params, *where))
            else:
                out.append(typical_accept(rows, d, seq.params, *where, self.options.typical_epsilon,
                                          self.options.typical_delta))
        return out
