"""Peak GPU memory and wall time of the full-scale diffusion victims, with RANDOM weights (not a test).

    python benchmarks/full_scale_gpu.py --out full_scale_gpu.json          # H200: published geometry, bf16, cuda
    python benchmarks/full_scale_gpu.py --tiny --out /tmp/x.json            # CPU: tiny random geometry (the test)

Builds LLaDA-V (``models.llada_v_full``) and LaViDa (``models.lavida_full``) at the published geometry
(LLaDA 8B: 4096 x 32 layers, vocab 126464; SigLIP so400m at 26 layers; mlp2x_gelu) with random weights —
nothing is downloaded, no tokenizer is read (token ids are drawn directly) — and measures, per model:

  a. forward: one 384^2 image (LLaDA-V 1485 / LaViDa 406 visual tokens) + a 32-token masked answer;
  b. DiSP's saliency pass (``defenses.disp.saliency``; the paper's settings: 6 Hutchinson probes, top-5
     logits, first block of 32; probes looped, one backward each, as at full scale);
  c. 32-token generation at steps 32, block 32 (LaViDa: with and without the Prefix-DLM prompt cache);
  d. one projector-only training step at batch 8, and an epoch of 1,000 samples extrapolated from it
     (plain, and with every LM block recomputed in backward: ``LLaDA.checkpointing``).

Each part is guarded: a failure (e.g. out of memory) is reported in its entry and the others still run.
The JSON goes to stdout and to ``--out``. Timings use ``torch.cuda.synchronize``; "peak_gib" is
``torch.cuda.max_memory_allocated`` since the part started (weights included), or the process's peak
RSS growth on CPU.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.spec import Decoding  # noqa: E402
from defenses.disp import saliency  # noqa: E402
from models.base import Batch  # noqa: E402
from models.lavida_full import FullLaViDa, lavida_config  # noqa: E402
from models.llada_v_full import FullConfig, FullLLaDAV, random_model, tiny_config  # noqa: E402

PROMPT_TEXT = 64      # text tokens around the image (system prompt + headers + question), drawn at random
ANSWER = 32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Meter:
    """Wall time and peak memory of one block of work."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = round(time.perf_counter() - self.t0, 3)
        if self.device.type == "cuda":
            self.peak_gib = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 30, 2)
        else:
            self.peak_gib = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.rss0) / 2 ** 20, 3)
        return False


def make_batch(model, n: int, gen: torch.Generator, image_size: int) -> Batch:
    """n samples of one random image_size^2 image each, random prompt ids around the visual block
    (special ids kept out), a random 32-token answer."""
    V = model.cfg.vocab_size
    lo = 8 if V < 1000 else 100        # stay clear of the synthetic / published special ids
    hi = min(V, 126000)
    pre, post = PROMPT_TEXT // 2, PROMPT_TEXT - PROMPT_TEXT // 2
    T = model.n_visual
    ids = torch.randint(lo, hi, (n, pre + T + post), generator=gen)
    vis = torch.arange(pre, pre + T)[None].repeat(n, 1)
    images = torch.rand(n, image_size, image_size, 3, generator=gen)
    resp = torch.randint(lo, hi, (n, ANSWER), generator=gen)
    return Batch(images, ids, torch.ones_like(ids, dtype=torch.bool), vis, resp)


def guarded(out: dict, name: str, fn) -> None:
    try:
        out[name] = fn()
    except Exception as e:   # report and go on: one part's failure must not hide the others
        out[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}", "where": traceback.format_exc(limit=-2)[-600:]}
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def bench_model(name: str, cls, cfg: FullConfig, device: torch.device, dtype: torch.dtype, image_size: int,
                train_batch: int, epoch_samples: int, seed: int) -> dict:
    res: dict = {"model": name}
    with Meter(device) as m:
        model = random_model(cls, cfg, device=str(device), dtype=dtype, seed=seed)
    n_params = sum(p.numel() for p in model.parameters())
    res["build"] = {"seconds": m.seconds, "peak_gib": m.peak_gib, "params": n_params,
                    "projector_params": sum(p.numel() for p in model.mm_projector.parameters()),
                    "visual_tokens": model.n_visual}
    gen = torch.Generator().manual_seed(seed)
    one = make_batch(model, 1, gen, image_size)
    res["sequence_length"] = int(one.ids.shape[1]) + ANSWER

    def forward():
        with torch.no_grad(), Meter(device) as m:
            pe = model.prompt_embeds(one)
            answer = torch.full((1, ANSWER), model.mask_id, dtype=torch.long)
            logits = model.answer_logits(pe, one.key_mask, answer)
        return {"seconds": m.seconds, "peak_gib": m.peak_gib, "logits_shape": list(logits.shape)}

    def disp_saliency():
        with Meter(device) as m:
            s = saliency(model, one, block_length=32, gen_length=ANSWER, n_probes=6, top_k=5,
                         generator=torch.Generator().manual_seed(seed), batched=False)
        return {"seconds": m.seconds, "peak_gib": m.peak_gib, "scores_shape": list(s.shape),
                "finite": bool(torch.isfinite(s).all()), "settings": "6 probes (looped), top-5, block 32"}

    def generation(prefix: bool | None):
        dec = Decoding(gen_length=32, steps=32, block_length=32)
        kw = {} if prefix is None else {"prefix_dlm": prefix}
        with Meter(device) as m:
            out = model.generate(one, dec, generator=torch.Generator().manual_seed(seed), **kw)
        return {"seconds": m.seconds, "peak_gib": m.peak_gib, "tokens": int(out.shape[1]), "steps": 32}

    def train_step(checkpointing: bool = False):
        model.lm.checkpointing = checkpointing
        model.set_trainable("projector")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        batch = make_batch(model, train_batch, gen, image_size)
        g = torch.Generator().manual_seed(seed)
        times = []
        try:
            with Meter(device) as m:
                for _ in range(2):                 # the second step is the steady-state one
                    sync(device)
                    t0 = time.perf_counter()
                    loss = model.loss(batch, g)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sync(device)
                    times.append(time.perf_counter() - t0)
        finally:                                   # frozen and plain again, whatever happened
            model.requires_grad_(False)
            model.lm.checkpointing = False
        step = times[-1]
        steps = -(-epoch_samples // train_batch)
        return {"seconds_first": round(times[0], 3), "seconds_step": round(step, 3), "peak_gib": m.peak_gib,
                "batch": train_batch, "trainable_params": sum(p.numel() for p in params), "loss": round(loss.item(), 4),
                f"epoch_{epoch_samples}_estimate_s": round(steps * step, 1),
                "note": "estimate: steady-state step time x ceil(samples / batch); data loading not included"}

    guarded(res, "a_forward", forward)
    guarded(res, "b_disp_saliency", disp_saliency)
    if cls is FullLaViDa:
        guarded(res, "c_generate_no_cache", lambda: generation(False))
        guarded(res, "c_generate_prefix_cache", lambda: generation(True))
        a, b = res["c_generate_no_cache"], res["c_generate_prefix_cache"]
        if "seconds" in a and "seconds" in b and b["seconds"] > 0:
            res["prefix_cache_speedup"] = round(a["seconds"] / b["seconds"], 2)
    else:
        guarded(res, "c_generate", lambda: generation(None))
    guarded(res, "d_train_step", train_step)
    guarded(res, "d_train_step_block_checkpointing", lambda: train_step(True))
    del model
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random geometry on CPU (tests)")
    ap.add_argument("--out", default=None, help="write the JSON here too")
    ap.add_argument("--device", default=None, help="default: cuda if available (else cpu)")
    ap.add_argument("--models", default="llada-v,lavida")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--epoch-samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    if args.tiny:
        base, image_size = tiny_config(), 28
    else:
        base, image_size = FullConfig(), 384
    report = {"what": "full-scale victims with RANDOM weights: peak memory and wall time", "tiny": args.tiny,
              "device": str(device), "dtype": str(dtype).replace("torch.", ""), "image": f"{image_size}x{image_size}",
              "answer_tokens": ANSWER, "torch": torch.__version__, "python": platform.python_version(),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "models": []}
    try:
        import transformers
        report["transformers"] = transformers.__version__
    except ImportError:
        pass
    t0 = time.perf_counter()
    todo = {"llada-v": (FullLLaDAV, base), "lavida": (FullLaViDa, replace(base, pool_side=1) if args.tiny else lavida_config())}
    for name in args.models.split(","):
        cls, cfg = todo[name]
        entry: dict = {"model": name}
        try:
            entry = bench_model(name, cls, cfg, device, dtype, image_size, args.train_batch, args.epoch_samples, args.seed)
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        report["models"].append(entry)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
