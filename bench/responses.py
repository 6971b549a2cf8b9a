"""The victim's own responses: replace a real task's pool responses by the clean base model's generations.

DiSP App. B.1: "When constructing the poisoned datasets, we replace the original responses with
model-generated outputs from LLaDA-V, making the training data more consistent with the output style of
MDLMs." This is the data curator's step, before any poisoning: it reads only what a curator has — each
pool image, the task's instruction (wrapped in the victim's own chat template by ``collate``) and the
clean base model — never a trigger, a target or a poison flag. It decodes greedily with the cell's own
sampler settings (``Decoding``: DiSP's ASR runs use steps = gen_length = block_length = 32), so the
training answers have the length and style of the answers ASR later judges. The pipeline runs it as its
own cached stage (``responses``, keyed by the base stage, the task, the pool population and the
decoding), computed once and shared by the Clean, Backdoored and defended rows.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from tqdm.auto import tqdm

from core.errors import BenchError
from tasks.base import Sample


def generate_responses(model, samples: Sequence[Sample], decoding, seed: int, batch_size: int = 8) -> list[str]:
    """The model's answer to every sample's image and instruction, in order (responses are not read:
    the batch is collated without them)."""
    g = torch.Generator().manual_seed(int(seed))
    out: list[str] = []
    model.eval()
    with torch.no_grad():
        for i in tqdm(range(0, len(samples), batch_size), desc="victim responses", leave=False):
            chunk = [s.with_(response="", meta={}) for s in samples[i:i + batch_size]]   # image + prompt only
            batch = model.collate(chunk, with_response=False)
            out += [t.strip() for t in model.decode(model.generate(batch, decoding, generator=g))]
    return out


def with_responses(samples: Sequence[Sample], stage: dict) -> list[Sample]:
    """The samples with their responses replaced by a responses stage's answers (matched by image id;
    the stage's ids must be the samples' ids, in order). ``meta["response_source"]`` says so."""
    ids = [s.meta.get("image_id", s.meta.get("id")) for s in samples]
    if list(stage["ids"]) != ids:
        raise BenchError("the cached responses stage was generated for another pool (delete it to recompute)")
    return [s.with_(response=r, meta={**s.meta, "response_source": "victim"})
            for s, r in zip(samples, stage["responses"])]


def summary(stage: dict) -> dict:
    """What a record stores about the responses used: their count, how many came back empty, a hash of
    the texts and the decoding they were generated with."""
    texts = list(stage["responses"])
    return {"source": "victim", "n": len(texts), "empty": sum(not t for t in texts),
            "sha256": hashlib.sha256("\x1e".join(texts).encode()).hexdigest(),
            "decoding": stage.get("decoding")}
