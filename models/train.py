"""One fine-tuning loop for every stage (base, clean, backdoored, DiSP recovery): AdamW, linear
warmup + cosine decay (the DiSP/LLaDA-V schedule), the model's own loss, chosen trainable parts."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from tasks.base import Sample


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def finetune(model, samples: Sequence[Sample], *, trainable: str, lr: float, epochs: int, batch_size: int,
             seed: int, gen_length: int, desc: str = "fine-tune", warmup_frac: float = 0.03,
             on_epoch: Callable[[int], None] | None = None,
             objective: Callable | None = None) -> list[float]:
    """Train `trainable` parts of `model` on `samples` in place; returns per-step losses. `on_epoch(e)`
    runs after epoch e (1-based) with the model in eval mode (checkpoints of one run: learning curves);
    `objective(model, batch)` is added to the model's loss at every step (a training-time defense)."""
    model.set_trainable(trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    data = model.collate(samples, gen_length=gen_length)
    n = len(data)
    per_epoch = (n + batch_size - 1) // batch_size
    total = epochs * per_epoch
    warmup = max(1, int(warmup_frac * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, warmup))
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    with tqdm(total=total, desc=desc, leave=False) as bar:
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=g)
            for i in range(0, n, batch_size):
                batch = data[perm[i:i + batch_size]]
                loss = model.loss(batch, g)
                if objective is not None:
                    loss = loss + objective(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.update(1)
                if len(losses) % 10 == 0:
                    bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.3f}")
            if on_epoch is not None:
                model.eval()
                with torch.no_grad():
                    on_epoch(epoch + 1)
                model.train()
    model.eval()
    model.requires_grad_(False)  # inference afterwards; each training call picks its parts again
    return losses
