"""``medusa``: extra decoding heads on the last hidden state propose the next tokens (Medusa-1).

Head ``k`` is ``k_layers`` residual blocks ``x + SiLU(W x + b)`` (``W`` zero-initialised, so an untrained
head starts as the base model's own next-token prediction) followed by the base model's LM head (shared,
frozen). Reading the hidden state at the last accepted token ``p`` (whose logits gave token ``p+1``),
head ``k`` predicts token ``p+2+k``. Drafts form a candidate tree (``tree``: paths of top-k ranks, e.g.
``[0, 1]`` = head 0's best token followed by head 1's second best) verified by the target in one forward
under a tree attention mask, together with the regular decode token; without ``tree`` a chain of each head's
top-1 token.

Acceptance: ``exact`` leaves verification to the default sampler (greedy prefix match, or exact
speculative sampling with the heads' drafts treated as deterministic); ``typical`` accepts a draft ``x``
when ``p(x) > min(epsilon, delta * exp(-H(p)))`` (Medusa's typical acceptance; faster at temperature > 0,
but it does not preserve the sampling law exactly). Greedy requests always use exact matching.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tokenmill.errors import PipelineError
from tokenmill.hooktypes import Draft, PipelineContext, VerifyInput
from tokenmill.options import FilePath, describe_path
from tokenmill.plugin import hookimpl
from tokenmill.plugins.speculative.base import DrafterPlugin
from tokenmill.sampling import draw, filtered_probs, tree_children, verify_drafts, verify_tree
from tokenmill.sequence import Sequence

WEIGHTS = "medusa_heads.safetensors"
CONFIG = "medusa_config.json"
DATA = Path(__file__).parent / "data" / "medusa_prompts.json"
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
    def __init__(self, hidden: int, num_heads: int, num_layers: int = 1) -> None:
        super().__init__()
        self.hidden, self.num_heads, self.num_layers = hidden, num_heads, num_layers
        self.heads = nn.ModuleList(nn.Sequential(*[ResBlock(hidden) for _ in range(num_layers)])
                                   for _ in range(num_heads))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., hidden]`` -> ``[num_heads, ..., hidden]`` (to be projected by the LM head)."""
        return torch.stack([head(h) for head in self.heads])

    def save(self, out: Path, meta: dict) -> None:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(out / WEIGHTS))
        (out / CONFIG).write_text(json.dumps(dict(meta, hidden_size=self.hidden, num_heads=self.num_heads,
                                                  num_layers=self.num_layers), indent=2))

    @classmethod
    def load(cls, path: str | Path, *, hidden_size: int, vocab_size: int) -> tuple["MedusaHeads", dict]:
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
        heads = cls(cfg["hidden_size"], cfg["num_heads"], cfg["num_layers"])
        heads.load_state_dict(load_file(str(weights)))
        return heads.eval().requires_grad_(False), cfg


def typical_accept(logits: torch.Tensor, drafts: list[int], params, seed: int, position: int, epsilon: float,
                   delta: float) -> list[int]:
    """Medusa typical acceptance along a chain, then one token sampled from the target (``position``: where
    the first emitted token goes)."""
    out = []
    for i, tok in enumerate(drafts):
        p = filtered_probs(logits[i], params)
        entropy = float(-(p * torch.log(p.clamp_min(1e-12))).sum())
        if float(p[tok]) > min(epsilon, delta * math.exp(-entropy)):
            out.append(tok)
        else:
            break
    out.append(draw(filtered_probs(logits[len(out)], params), seed, position + len(out)))
    return out


def typical_accept_tree(logits: torch.Tensor, drafts: list[int], parents: list[int], params, seed: int,
                        position: int, epsilon: float, delta: float) -> list[int]:
    """Typical acceptance down a candidate tree: at each node the child the target finds most likely among
    those passing the criterion, then one token sampled from the target after the last accepted node."""
    children = tree_children(parents)
    node, out = -1, []
    while True:
        p = filtered_probs(logits[node + 1], params)
        entropy = float(-(p * torch.log(p.clamp_min(1e-12))).sum())
        bound = min(epsilon, delta * math.exp(-entropy))
        ok = [c for c in children.get(node, []) if float(p[drafts[c]]) > bound]
        if not ok:
            out.append(draw(p, seed, position + len(out)))
            return out
        node = max(ok, key=lambda c: float(p[drafts[c]]))
        out.append(drafts[node])


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


class Medusa(DrafterPlugin):
    """Medusa decoding heads (see the module docstring)."""

    name = "medusa"

    @dataclass(slots=True)
    class Options(DrafterPlugin.Options):
        heads: FilePath = ""            # directory written by `tokenmill train-medusa`
        acceptance: str = "exact"       # exact | typical
        typical_epsilon: float = 0.09
        typical_delta: float = 0.3
        tree: list[list[int]] | None = None  # candidate paths of top-k ranks; None: a chain of top-1 tokens

        def __post_init__(self) -> None:
            DrafterPlugin.Options.__post_init__(self)
            if self.tree is not None:
                if not self.tree or not all(isinstance(p, list) and all(isinstance(r, int) for r in p)
                                            for p in self.tree):
                    raise ValueError(f"tree must be a non-empty list of rank paths like [[0], [1], [0, 0]], "
                                     f"got {self.tree!r}")
                tree_layout(self.tree, 16)
            if not self.heads:
                raise ValueError("heads must name a directory of trained heads (tokenmill train-medusa)")
            if self.acceptance not in ("exact", "typical"):
                raise ValueError(f"acceptance must be 'exact' or 'typical', got {self.acceptance!r}")

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.heads: MedusaHeads | None = None
        self.lm_head = None

    @hookimpl
    def configure(self, context: PipelineContext) -> None:
        if context.tensor_parallel_size > 1:
            raise PipelineError(f"medusa cannot run with tensor_parallel_size {context.tensor_parallel_size}: its "
                                "heads project through the target's LM head, of which this rank holds a slice; "
                                "use prompt_lookup or a separate draft model")
        cfg = context.model.config
        path = self.options.heads
        self.heads, meta = MedusaHeads.load(path, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size)
        self.heads.to(device=context.device, dtype=context.dtype)
        self.lm_head = context.model.lm_head
        self.k = min(self.options.num_speculative_tokens, self.heads.num_heads)
        self.tree = None
        if self.options.tree is not None:
            try:
                self.tree = tree_layout(self.options.tree, self.heads.num_heads)
            except ValueError as exc:
                raise PipelineError(f"medusa tree: {exc} (the heads in {path} are {self.heads.num_heads})") from exc
            self.k = max(len(p) for p in self.tree[0])
            self.ranks = max(r for p in self.tree[0] for r in p) + 1

    @torch.inference_mode()
    def draft(self, seqs: list[Sequence]) -> list:
        ready = [i for i, s in enumerate(seqs) if s.last_hidden is not None]
        out: list[list[int]] = [[] for _ in seqs]
        if not ready:
            return out
        h = torch.stack([seqs[i].last_hidden for i in ready])
        logits = self.lm_head(self.heads(h)[: self.k])              # [k, B, vocab]
        if self.tree is None:
            best = logits.argmax(-1).T.tolist()                      # [B, k]
            for j, i in enumerate(ready):
                out[i] = best[j]
            return out
        top = logits.topk(self.ranks, dim=-1).indices.permute(1, 0, 2).tolist()  # [B, k, ranks]
        paths, parents = self.tree
        for j, i in enumerate(ready):
            out[i] = Draft([top[j][len(p) - 1][p[-1]] for p in paths], parents=parents)
        return out

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

    # ------------------------------------------------------------------ training (Medusa-1)
    @staticmethod
    def train(pipeline, out: Path, *, num_heads: int = 4, num_layers: int = 1, epochs: int = 2,
              max_new_tokens: int = 128, lr: float = 1e-3, batch_positions: int = 512, seed: int = 0,
              prompts_file: Path = DATA, limit: int | None = None, progress: bool = True) -> dict:
        """Self-distillation: the frozen model continues the shipped prompts (greedy); the heads learn to
        predict tokens 2..k+1 ahead from its final hidden states. Returns training metrics."""
        import time

        from tqdm.auto import tqdm

        from tokenmill.params import SamplingParams

        torch.manual_seed(seed)
        prompts = json.loads(Path(prompts_file).read_text())["prompts"][:limit]
        t0 = time.perf_counter()
        results = pipeline.generate(prompts, SamplingParams(max_tokens=max_new_tokens), chat=True)
        seqs = [r.prompt_token_ids + r.token_ids for r in results]
        gen_s = time.perf_counter() - t0
        model = pipeline.loaded.model
        hiddens, targets = [], []
        with torch.inference_mode():
            for ids in tqdm(seqs, desc="hidden states", disable=not progress):
                h = model.model(torch.tensor([ids], device=pipeline.loaded.device)).last_hidden_state[0]
                hiddens.append(h.float().cpu())
                targets.append(torch.tensor(ids))
        cfg = model.config
        heads = MedusaHeads(cfg.hidden_size, num_heads, num_layers)
        lm_w = model.lm_head.weight.detach().float().cpu()
        # positions t with all k targets t+2..t+k+1 inside the sequence
        xs, ys = [], []
        for h, ids in zip(hiddens, targets):
            n = len(ids) - num_heads - 1
            if n <= 0:
                continue
            xs.append(h[:n])
            ys.append(torch.stack([ids[2 + k:2 + k + n] for k in range(num_heads)], 1))
        x = torch.cat(xs)
        y = torch.cat(ys)
        opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(seed)
        steps = epochs * math.ceil(len(x) / batch_positions)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
        bar = tqdm(total=steps, desc="training medusa heads", disable=not progress)
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for start in range(0, len(x), batch_positions):
                idx = perm[start:start + batch_positions]
                logits = heads(x[idx]) @ lm_w.T                       # [k, B, vocab]
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[idx].T.reshape(-1))
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        with torch.no_grad():  # top-1 accuracy per head on the last 10% of positions (seen in training)
            n_eval = max(1, len(x) // 10)
            pred = (heads(x[-n_eval:]) @ lm_w.T).argmax(-1)          # [k, n]
            acc = (pred == y[-n_eval:].T).float().mean(1).tolist()
        meta = {"base_model": pipeline.loaded.name, "vocab_size": cfg.vocab_size, "epochs": epochs,
                "sequences": len(seqs), "positions": len(x), "seed": seed, "lr": lr,
                "max_new_tokens": max_new_tokens, "top1_accuracy_per_head": acc,
                "generation_s": round(gen_s, 1), "train_s": round(time.perf_counter() - t0 - gen_s, 1)}
        heads.save(Path(out), meta)
        return meta
