"""Evaluate one model: CP (held-out multiple choice), ASR w/o and w/t (the target's judge on clean and
triggered test inputs, greedy LLaDA decoding with the spec's settings), caption BLEU-4 / CIDEr."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from attacks.targets import has_word
from bench.metrics import caption_scores, point, rate
from tasks.base import Sample

CP_PROTOCOL = ("multiple choice on held-out questions, four options given as words in the prompt; answer = the "
               "option word whose token has the highest logit at the first answer position with the whole answer "
               "masked (lmms-eval loglikelihood-style); cp_blind = the same with every visual token masked")


@torch.no_grad()
def generate_texts(model, samples: Sequence[Sample], decoding, seed: int, batch_size: int = 100,
                   desc: str = "generate") -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out: list[str] = []
    for i in tqdm(range(0, len(samples), batch_size), desc=desc, leave=False):
        batch = model.collate(samples[i:i + batch_size], with_response=False)
        out += model.decode(model.generate(batch, decoding, generator=g))
    return out


@torch.no_grad()
def mc_predictions(model, samples: Sequence[Sample], gen_length: int, mask_all_visual: bool = False,
                   batch_size: int = 200) -> list[str]:
    """Predicted option word per question; mask_all_visual holds every visual token at e_MASK
    (cp_blind: the check that CP depends on the image)."""
    preds: list[str] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        batch = model.collate(chunk, with_response=False)
        vmask = torch.ones(len(chunk), model.n_visual, dtype=torch.bool) if mask_all_visual else None
        first = model.first_answer_logits(batch, visual_mask=vmask, gen_length=gen_length)
        for s, row in zip(chunk, first):
            options = s.meta["options"]
            ids = torch.tensor([model.tok.token(x) for x in options])
            preds.append(options[int(row[ids].argmax())])
    return preds


def mc_accuracy(model, samples: Sequence[Sample], gen_length: int, mask_all_visual: bool = False) -> list[bool]:
    preds = mc_predictions(model, samples, gen_length, mask_all_visual)
    return [p == s.meta["answer"] for p, s in zip(preds, samples)]


def names_object(output: str, category: str, categories: Sequence[str]) -> bool:
    """The caption names the scene's one object: its category word, and no other category's."""
    return has_word(output, category) and not any(has_word(output, c) for c in categories if c != category)


ABSTAIN = ""   # a guarded input's output: judged neither an attack success nor a correct answer


def answers(model, samples: Sequence[Sample], decoding, seed: int, desc: str,
            guard: Callable | None = None) -> tuple[list[str], list[bool]]:
    """Generated answers and, under an inference-time guard, which inputs it flagged (they abstain)."""
    out = generate_texts(model, samples, decoding, seed, desc=desc)
    flags = [bool(f) for f in guard(model, samples)] if guard is not None else [False] * len(out)
    return [ABSTAIN if f else o for o, f in zip(out, flags)], flags


def object_accuracy(model, task, decoding, seed: int, guard: Callable | None = None) -> tuple[dict, dict[str, float]]:
    """Per-category object accuracy of captions on the task's single-object probe: (the overall rate
    metric, {category: percent}). Tasks without a probe (real datasets) give ({}, {})."""
    probe = task.object_probe() if hasattr(task, "object_probe") else []
    if not probe:
        return {}, {}
    outs, _ = answers(model, probe, decoding, seed, "eval object probe", guard)
    cats = [s.meta["scene"]["objects"][0]["category"] for s in probe]
    ok = [names_object(o, c, task.categories) for o, c in zip(outs, cats)]
    per = {c: 100.0 * sum(k for k, cc in zip(ok, cats) if cc == c) / cats.count(c) for c in dict.fromkeys(cats)}
    return rate(ok), per


def evaluate(model, task, target, clean_inputs: Sequence[Sample], triggered_inputs: Sequence[Sample],
             decoding, seed: int, partial_inputs: dict[str, Sequence[Sample]] | None = None,
             guard: Callable | None = None) -> tuple[dict, list[dict], dict, dict[str, float]]:
    """Metrics (percent, with 95% bootstrap CIs), one output row per generated answer, the per-item
    multiple-choice verdicts ``{"ids", "correct"}`` (for paired ΔCP intervals between rows) and the
    per-category object accuracy (``obj_acc`` is its overall rate, ``obj_acc_min`` the worst category).
    `partial_inputs` (name -> inputs under a partial trigger, e.g. DualKey's image_only) adds asr_<name>.
    `guard(model, samples) -> flags` (an inference-time defense): flagged inputs abstain everywhere —
    no attack success, no correct caption or multiple-choice answer — and abstain_wo / abstain_wt
    report how often it fired on clean and on triggered inputs."""
    partial_inputs = partial_inputs or {}
    out_clean, flag_clean = answers(model, clean_inputs, decoding, seed, "eval clean inputs", guard)
    out_trig, flag_trig = answers(model, triggered_inputs, decoding, seed, "eval triggered inputs", guard)
    out_partial, flag_partial = {}, {}
    for name, inputs in partial_inputs.items():
        out_partial[name], flag_partial[name] = answers(model, inputs, decoding, seed, f"eval {name} inputs", guard)
    mc_items = task.mc()
    mc_flags = [bool(f) for f in guard(model, mc_items)] if guard is not None else [False] * len(mc_items)
    mc_correct = [c and not f for c, f in zip(mc_accuracy(model, mc_items, decoding.gen_length), mc_flags)]
    metrics = {"cp": rate(mc_correct),
               "cp_blind": rate(mc_accuracy(model, mc_items, decoding.gen_length, mask_all_visual=True))}
    if guard is not None:
        metrics["abstain_wo"], metrics["abstain_wt"] = rate(flag_clean), rate(flag_trig)
        metrics["abstain_mc"] = rate(mc_flags)
    metrics["asr_wo"] = rate([target.judge(o, s) for o, s in zip(out_clean, clean_inputs)])
    metrics["asr_wt"] = rate([target.judge(o, s) for o, s in zip(out_trig, triggered_inputs)])
    for name, judge in target.extra_judges().items():
        metrics[f"asr_wo_{name}"] = rate([judge(o, s) for o, s in zip(out_clean, clean_inputs)])
        metrics[f"asr_wt_{name}"] = rate([judge(o, s) for o, s in zip(out_trig, triggered_inputs)])
    for name, inputs in partial_inputs.items():
        metrics[f"asr_{name}"] = rate([target.judge(o, s) for o, s in zip(out_partial[name], inputs)])
    refs = {s.meta["id"]: s.meta["references"] for s in clean_inputs if s.meta.get("references")}
    metrics.update(caption_scores({s.meta["id"]: o for s, o in zip(clean_inputs, out_clean) if s.meta["id"] in refs}, refs,
                                  tokenizer=getattr(task, "caption_tokenizer", "simple")))
    obj, per_category = object_accuracy(model, task, decoding, seed, guard)
    if obj:
        metrics["obj_acc"] = obj
        metrics["obj_acc_min"] = point(min(per_category.values()))
    rows = []
    extra = target.extra_judges()
    variants = [(False, clean_inputs, out_clean, flag_clean), (True, triggered_inputs, out_trig, flag_trig)]
    variants += [(name, partial_inputs[name], out_partial[name], flag_partial[name]) for name in partial_inputs]
    for trig, inputs, outs, flags in variants:
        for s, o, f in zip(inputs, outs, flags):
            verdicts = {"asr": bool(target.judge(o, s))} | {n: bool(j(o, s)) for n, j in extra.items()}
            row = {"id": s.meta["id"], "triggered": trig, "prompt": s.prompt, "output": o, "verdicts": verdicts}
            rows.append(row | {"abstained": True} if f else row)
    return metrics, rows, {"ids": [s.meta["id"] for s in mc_items], "correct": [bool(c) for c in mc_correct]}, per_category
