"""The checkpoint's own tokenizer behind the interface the embedded task's ``Tokenizer`` offers.

Why an adapter (and not a second task): at full scale the model reads text with the tokenizer it was
trained with (``tokenizer.json`` in the checkpoint directory, loaded offline with the ``tokenizers``
library — no hub, no remote code), while the rest of the bench (targets, attacks, DiSP's ``fit_answer``,
CP option scoring) only ever calls ``encode`` / ``decode`` / ``token`` and reads a few special ids.
So the task keeps producing plain text; the full-scale model owns a ``CheckpointTokenizer`` and the
pipeline hands every text to it. The synthetic task's words are ordinary text to a BPE tokenizer, so
the embedded task runs unchanged on a full-scale model (its word-level ``Tokenizer`` is only used by
the tiny replicas).

Special ids come from the checkpoint: ``config.json`` (``mask_token_id``, ``eos_token_id``, ...) when it
names them, else the tokenizer's own entry for the published token string, else the published id
(LLaDA: bos 126080, eos 126081, mask 126336, <|start_header_id|> 126346, <|end_header_id|> 126347,
<|eot_id|> 126348; ML-GSAI/LLaDA-V ``train/generate_demo.py`` and the LLaDA tokenizer).
"""
from __future__ import annotations

import os
from pathlib import Path

from core.errors import BenchError

# role -> (published token string, published id, config.json field)
LLADA_SPECIALS = {
    "bos": ("<|startoftext|>", 126080, "bos_token_id"),
    "eos": ("<|endoftext|>", 126081, "eos_token_id"),
    "mask": ("<|mdm_mask|>", 126336, "mask_token_id"),
    "start_header": ("<|start_header_id|>", 126346, None),
    "end_header": ("<|end_header_id|>", 126347, None),
    "eot": ("<|eot_id|>", 126348, None),
}


class CheckpointTokenizer:
    """A ``tokenizers.Tokenizer`` from a checkpoint directory with the embedded task's tokenizer API:
    ``encode(text) -> ids`` (no special tokens added), ``decode(ids)`` (up to the first end token,
    skipping mask / pad / bos), ``token(word)`` (a single id or ValueError), and the special ids
    ``bos_id, eos_id, pad_id, mask_id, image_id, eot_id, start_header_id, end_header_id``."""

    def __init__(self, path: str | os.PathLike, config: dict | None = None, specials: dict = LLADA_SPECIALS):
        from tokenizers import Tokenizer

        f = Path(path) / "tokenizer.json"
        if not f.exists():
            raise BenchError(f"{path}: no tokenizer.json (the full-scale model reads text with the checkpoint's tokenizer)")
        try:
            self._tk = Tokenizer.from_file(str(f))
        except Exception as e:  # the tokenizers library raises its own exception type
            raise BenchError(f"{f}: not a readable tokenizer ({e})") from None
        config = config or {}
        ids = {}
        for role, (text, published, field) in specials.items():
            tid = config.get(field) if field else None
            if tid is None:
                tid = self._tk.token_to_id(text)
            ids[role] = int(published if tid is None else tid)
        self.bos_id, self.eos_id, self.mask_id = ids["bos"], ids["eos"], ids["mask"]
        self.eot_id, self.start_header_id, self.end_header_id = ids["eot"], ids["start_header"], ids["end_header"]
        self.pad_id = int(config.get("pad_token_id") or self.eos_id)    # LLaDA pads answers with EOS
        self.image_id = self.pad_id       # placeholder id at visual positions (their embeddings are replaced)
        self.vocab_size = self._tk.get_vocab_size(with_added_tokens=True)
        self._stop = {self.eos_id, self.eot_id}
        self._skip = {self.mask_id, self.bos_id}

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_template(self, text: str) -> list[int]:
        """Template text with its special tokens written out (``<|eot_id|>`` ...) -> ids."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def token(self, word: str) -> int:
        ids = self.encode(word)
        if len(ids) != 1:
            raise ValueError(f"{word!r} is not a single token of the checkpoint's tokenizer ({len(ids)} tokens)")
        return ids[0]

    def decode(self, ids) -> str:
        """Text of ``ids`` up to the first <|eot_id|> or <|endoftext|>, skipping mask and bos."""
        out = []
        for i in ids:
            i = int(i)
            if i in self._stop:
                break
            if i not in self._skip:
                out.append(i)
        return self._tk.decode(out, skip_special_tokens=True).strip()


def write_word_tokenizer(path: str | os.PathLike, words: list[str], specials: dict[str, int]) -> None:
    """Write a tiny word-level ``tokenizer.json`` (whitespace split; ``specials``: token string -> id,
    matched anywhere in text) for synthetic checkpoints: ordinary words take the ids after the
    specials. Used by tests and synthetic full-scale checkpoints, never by a real run."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, decoders

    vocab = dict(specials)
    vocab.setdefault("[UNK]", max(vocab.values(), default=-1) + 1)
    for w in words:
        if w not in vocab:
            vocab[w] = max(vocab.values()) + 1
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)   # joins words with single spaces
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    Path(path).mkdir(parents=True, exist_ok=True)
    tk.save(str(Path(path) / "tokenizer.json"))
