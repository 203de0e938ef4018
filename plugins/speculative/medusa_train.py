"""``tokenmill train-medusa``: Medusa-1 heads by self-distillation on the model's own greedy continuations.

The frozen model answers a prompt set (``data/medusa_prompts.json``: chat, code and grounded prompts, written
by ``scripts/make_medusa_prompts.py``; every tenth prompt held out). The heads learn from the final (normed)
hidden state ``h[t]`` — the state :class:`~tokenmill.plugins.speculative.medusa.Medusa` reads at decode time —
to predict token ``t + 2 + k`` with head ``k``, on **generated positions only** (``t >= len(prompt) - 1``):
those are the positions a head drafts at. Prompt positions are excluded because the chat template makes them
easy (a fixed system prompt the heads memorize), which is what made the first heads report 43 % top-1 while
accepting 2.5 % of drafts. The loss is cross-entropy on the model's greedy token (a KL loss against its full
next-token distribution was tried and was no better: 15.0 vs 16.1 % held-out top-1). Per-head, per-rank accuracy is
measured on the held-out prompts' generated positions and saved with the heads; the plugin builds its
candidate tree from it (``tree_size``).

The command is registered through the ``tokenmill.commands`` entry-point group (see docs/hooks.md).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tokenmill.plugins.speculative.medusa import MAX_RANK, MedusaHeads

DATA = Path(__file__).parent / "data" / "medusa_prompts.json"
IGNORE = -100


@dataclass(slots=True)
class Examples:
    """Training positions of a set of sequences: ``hidden[rows[i]]`` is the state at a generated position ``t``,
    ``targets[i, k]`` the token head ``k`` must predict there (``t + 2 + k``; ``IGNORE`` past the end)."""
    hidden: torch.Tensor    # [N_all, hidden] every position's state
    rows: torch.Tensor      # [N] rows of ``hidden`` that are training positions
    targets: torch.Tensor   # [N, K]
    next_tokens: torch.Tensor  # [N] token t + 1 (the decode token when the heads draft from ``hidden[t]``)


def load_prompts(path: Path) -> list[dict]:
    """The prompt file: ``{"prompts": [...]}`` of strings or ``{"prompt": ..., "kind": ...}`` objects."""
    raw = json.loads(Path(path).read_text())["prompts"]
    out = [p if isinstance(p, dict) else {"prompt": p, "kind": "chat"} for p in raw]
    if not out or not all(isinstance(p.get("prompt"), str) and p["prompt"] for p in out):
        raise ValueError(f"{path}: 'prompts' must be a non-empty list of strings or objects with a 'prompt' string")
    return out


def split(prompts: list[dict], every: int = 10) -> tuple[list[dict], list[dict]]:
    """(training, held out): every ``every``-th prompt is held out."""
    return ([p for i, p in enumerate(prompts) if i % every != every - 1],
            [p for i, p in enumerate(prompts) if i % every == every - 1])


def positions(prompt_len: int, length: int, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated positions of one sequence and their targets: ``t`` from ``prompt_len - 1`` (the last prompt
    token, whose state drafts the first speculation after prefill) while ``t + 2 <= length - 1``; targets
    ``[n, num_heads]`` = the index of token ``t + 2 + k`` in the sequence, or ``IGNORE`` past its end."""
    first = max(prompt_len - 1, 0)
    t = torch.arange(first, max(first, length - 2))
    idx = t[:, None] + 2 + torch.arange(num_heads)[None, :]
    return t, torch.where(idx < length, idx, torch.full_like(idx, IGNORE))


def build_examples(hiddens: list[torch.Tensor], sequences: list[list[int]], prompt_lens: list[int],
                   num_heads: int) -> Examples:
    rows, targets, nxt, offset = [], [], [], 0
    for h, ids, p in zip(hiddens, sequences, prompt_lens):
        t, idx = positions(p, len(ids), num_heads)
        tok = torch.tensor(ids)
        targets.append(torch.where(idx == IGNORE, IGNORE, tok[idx.clamp(0, len(ids) - 1)]))
        nxt.append(tok[t + 1])
        rows.append(offset + t)
        offset += len(ids)
    return Examples(torch.cat(hiddens), torch.cat(rows), torch.cat(targets), torch.cat(nxt))


@dataclass(slots=True)
class Frozen:
    """The base model's parts the heads use, frozen: the LM head's rows of the draft vocabulary ``vocab``
    (token ids; ``index[token]`` is a token's row in it or ``IGNORE``), float32 on the CPU, and the input
    embedding module, called as decoding calls it (some families scale inside it)."""
    lm_w: torch.Tensor      # [len(vocab), hidden]
    embed: nn.Module
    vocab: torch.Tensor     # [len(vocab)]
    index: torch.Tensor     # [vocab_size]


def frozen(model, vocab: torch.Tensor) -> Frozen:
    lm = model.lm_head.weight.detach().float().cpu()
    index = torch.full((lm.shape[0],), IGNORE, dtype=torch.long)
    index[vocab] = torch.arange(len(vocab))
    return Frozen(lm[vocab], model.get_input_embeddings(), vocab, index)


def draft_vocab(sequences: list[list[int]], prompt_lens: list[int], vocab_size: int, size: int) -> torch.Tensor:
    """The ``size`` tokens generated most often (ids ascending); ``size`` 0 or >= vocab_size: every token."""
    if not size or size >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.zeros(vocab_size)
    for ids, p in zip(sequences, prompt_lens):
        counts += torch.bincount(torch.tensor(ids[p:], dtype=torch.long), minlength=vocab_size)[:vocab_size]
    return counts.topk(size).indices.sort().values


def head_logits(heads: MedusaHeads, base: Frozen, ex: Examples, idx) -> torch.Tensor:
    e = None
    if heads.token_input:
        with torch.no_grad():
            e = base.embed(ex.next_tokens[idx].to(base.embed.weight.device)).float().cpu()
    return heads(ex.hidden[ex.rows[idx]], e) @ base.lm_w.T                    # [K, B, len(vocab)]


def loss_of(heads: MedusaHeads, base: Frozen, ex: Examples, idx: torch.Tensor) -> torch.Tensor:
    logits = head_logits(heads, base, ex, idx)                              # [K, B, V]
    tok = ex.targets[idx].T                                                 # [K, B]
    target = torch.where(tok == IGNORE, IGNORE, base.index[tok.clamp_min(0)])  # outside the draft vocab: ignored
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def rank_accuracy(heads: MedusaHeads, base: Frozen, ex: Examples, ranks: int = MAX_RANK,
                  batch: int = 1024) -> list[list[float]]:
    """``acc[k][r]``: how often head ``k``'s rank-``r`` token is the target (over the positions where it has one)."""
    hits = torch.zeros(heads.num_heads, ranks)
    count = torch.zeros(heads.num_heads)
    for start in range(0, len(ex.rows), batch):
        sl = slice(start, start + batch)
        top = base.vocab[head_logits(heads, base, ex, sl).topk(ranks, -1).indices]  # [K, B, R] token ids
        target = ex.targets[sl].T                                                   # [K, B]
        hits += (top == target[..., None]).sum(1).float()
        count += (target != IGNORE).sum(1).float()
    return (hits / count.clamp_min(1)[:, None]).tolist()


def continuations(pipeline, prompts: list[dict], max_new_tokens: int) -> tuple[list[list[int]], list[int]]:
    from tokenmill.params import SamplingParams

    results = pipeline.generate([p["prompt"] for p in prompts], SamplingParams(max_tokens=max_new_tokens), chat=True)
    return [r.prompt_token_ids + r.token_ids for r in results], [len(r.prompt_token_ids) for r in results]


@torch.inference_mode()
def final_hidden(model, sequences: list[list[int]], device) -> list[torch.Tensor]:
    """The final normed hidden state at every position (what the runner hands Medusa at decode time)."""
    return [model.model(torch.tensor([ids], device=device)).last_hidden_state[0].float().cpu() for ids in sequences]


def train(pipeline, out: Path, *, num_heads: int = 4, num_layers: int = 2, epochs: int = 6,
          max_new_tokens: int = 192, lr: float = 1e-3, batch_positions: int = 256, seed: int = 0,
          prompts_file: Path = DATA, limit: int | None = None, token_input: bool = True, vocab: int = 4096,
          progress: bool = True) -> dict:
    """Generate, train, evaluate on the held-out prompts, save to ``out``; returns the saved metadata."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    prompts = load_prompts(prompts_file)[:limit]
    train_p, held_p = split(prompts)
    if not held_p:
        raise ValueError(f"need at least 10 prompts (every tenth is held out), got {len(prompts)}")
    t0 = time.perf_counter()
    seqs, plens = continuations(pipeline, train_p + held_p, max_new_tokens)
    gen_s = time.perf_counter() - t0
    model = pipeline.loaded.model
    hid = final_hidden(model, seqs, pipeline.loaded.device)
    n = len(train_p)
    tr = build_examples(hid[:n], seqs[:n], plens[:n], num_heads)
    ev = build_examples(hid[n:], seqs[n:], plens[n:], num_heads)
    cfg = model.config
    heads = MedusaHeads(cfg.hidden_size, num_heads, num_layers, token_input)
    base = frozen(model, draft_vocab(seqs[:n], plens[:n], cfg.vocab_size, vocab))
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    steps = max(1, epochs * math.ceil(len(tr.rows) / batch_positions))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t1 = time.perf_counter()
    bar = tqdm(total=steps, desc="training medusa heads", disable=not progress)
    for _ in range(epochs):
        perm = torch.randperm(len(tr.rows), generator=g)
        for start in range(0, len(perm), batch_positions):
            value = loss_of(heads, base, tr, perm[start:start + batch_positions])
            opt.zero_grad()
            value.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{value.item():.3f}")
    bar.close()
    acc = rank_accuracy(heads, base, ev)
    meta = {"base_model": pipeline.loaded.name, "vocab_size": cfg.vocab_size, "epochs": epochs,
            "token_input": token_input, "draft_vocab": len(base.vocab),
            "sequences": n, "heldout_sequences": len(held_p), "positions": len(tr.rows),
            "heldout_positions": len(ev.rows), "seed": seed, "lr": lr, "max_new_tokens": max_new_tokens,
            "heldout_top1_per_head": [round(a[0], 4) for a in acc], "heldout_rank_accuracy": acc,
            "generation_s": round(gen_s, 1), "train_s": round(time.perf_counter() - t1, 1)}
    heads.save(Path(out), meta, base.vocab if len(base.vocab) < cfg.vocab_size else None)
    return meta


# ---------------------------------------------------------------------------------------------- the command
def _run(args: argparse.Namespace) -> int:
    from tokenmill import Pipeline

    pipe = Pipeline.from_yaml(args.pipeline, progress=not args.quiet)
    meta = train(pipe, Path(args.out), num_heads=args.num_heads, num_layers=args.num_layers, epochs=args.epochs,
                 max_new_tokens=args.max_new_tokens, lr=args.lr, seed=args.seed, limit=args.limit,
                 prompts_file=Path(args.prompts), token_input=not args.no_token_input,
                 vocab=args.draft_vocab, progress=not args.quiet)
    shown = {k: v for k, v in meta.items() if k != "heldout_rank_accuracy"}
    print(f"wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return 0


def register(sub) -> None:
    """``tokenmill.commands`` entry point: add ``train-medusa`` to the CLI's subcommands."""
    med = sub.add_parser("train-medusa", help="train Medusa heads on the model's own continuations")
    med.add_argument("pipeline")
    med.add_argument("--out", required=True)
    med.add_argument("--num-heads", type=int, default=4)
    med.add_argument("--num-layers", type=int, default=2)
    med.add_argument("--epochs", type=int, default=6)
    med.add_argument("--max-new-tokens", type=int, default=192)
    med.add_argument("--lr", type=float, default=1e-3)
    med.add_argument("--no-token-input", action="store_true",
                     help="heads read the hidden state only (Medusa-1), not also the decode token's embedding")
    med.add_argument("--draft-vocab", type=int, default=4096,
                     help="heads score only the N tokens generated most often (0: the whole vocabulary)")
    med.add_argument("--seed", type=int, default=0)
    med.add_argument("--prompts", default=str(DATA), help="prompt file (default: the shipped set)")
    med.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    med.add_argument("--quiet", action="store_true")
    med.set_defaults(func=_run)
