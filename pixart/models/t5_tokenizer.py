"""T5's tokenizer, read from an HF tokenizer folder without transformers.

transformers imports PyTorch wherever it is installed (about 3 s per process, and the runtime path never needs torch),
so the folder is read with the libraries transformers itself uses: SentencePiece for `spiece.model` (the public PixArt
and T5 v1.1 folders), the tokenizers library for a `tokenizer.json`. The ids equal transformers' `T5Tokenizer`'s
(tests/test_t5.py compares them): special tokens written in the text (`</s>`, `<extra_id_0>`, ...) are split out as
their ids, one `</s>` is appended, truncation keeps room for it, padding uses `<pad>`.
"""
from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np

from ..io import CheckpointError

_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


class T5Tokenizer:
    """The subset of transformers' T5Tokenizer that PixArt uses: `__call__` (padding to `max_length`,
    truncation, `return_tensors="np"`), `decode`, the special token ids and `save_pretrained`."""

    def __init__(self, folder):
        self.folder = Path(folder)
        config_file = self.folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        self.model_max_length = config.get("model_max_length", 512)
        if (self.folder / "tokenizer.json").exists():
            from tokenizers import Tokenizer  # the backend of transformers' fast tokenizers
            self._fast = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
            # a tokenizer.json saved after a call keeps that call's padding and truncation: ours are applied below
            self._fast.no_padding()
            self._fast.no_truncation()
            self._sp, piece_id, size = None, self._fast.token_to_id, self._fast.get_vocab_size(with_added_tokens=True)
            self.vocab_size = size
        else:
            import sentencepiece as spm
            self._fast, self._sp = None, spm.SentencePieceProcessor(model_file=str(self.folder / "spiece.model"))
            extra = int(config.get("extra_ids", 100))  # transformers' default: 100 sentinels after the pieces
            self.vocab_size = self._sp.get_piece_size() + extra
            self._sentinels = {f"<extra_id_{i}>": self.vocab_size - 1 - i for i in range(extra)}
            piece_id = self._piece_id
        self.pad_token, self.eos_token, self.unk_token = "<pad>", "</s>", "<unk>"
        self.pad_token_id, self.eos_token_id, self.unk_token_id = (piece_id(t) for t in ("<pad>", "</s>", "<unk>"))
        if self._sp is not None:
            self._special = {t: piece_id(t) for t in ("<pad>", "</s>", "<unk>")} | self._sentinels
            names = sorted(self._special, key=len, reverse=True)
            self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")")

    def _piece_id(self, token: str) -> int:
        if token in getattr(self, "_sentinels", {}):
            return self._sentinels[token]
        return self._sp.piece_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of one text, `</s>` appended (also after a written `</s>`, as transformers 5 does)."""
        if self._fast is not None:
            ids = self._fast.encode(text, add_special_tokens=False).ids
        else:
            ids = []
            for part in self._split.split(text):
                if part in self._special:
                    ids.append(self._special[part])
                elif part:
                    ids += self._sp.encode(part)
        return ids + [self.eos_token_id] * add_special_tokens

    def __call__(self, text, padding=False, max_length=None, truncation=False, add_special_tokens=True,
                 return_tensors=None, **_):
        texts = [text] if isinstance(text, str) else list(text)
        rows = []
        for t in texts:
            ids = self.encode(t, add_special_tokens=False)
            if truncation and max_length is not None:
                ids = ids[:max(max_length - int(add_special_tokens), 0)]
            rows.append(ids + [self.eos_token_id] * add_special_tokens)
        masks = [[1] * len(r) for r in rows]
        if padding in (True, "longest") or (padding == "max_length" and max_length is not None):
            width = max_length if padding == "max_length" else max(map(len, rows))
            masks = [m + [0] * (width - len(m)) for m in masks]
            rows = [r + [self.pad_token_id] * (width - len(r)) for r in rows]
        if return_tensors == "np":
            rows, masks = np.asarray(rows, dtype=np.int64), np.asarray(masks, dtype=np.int64)
        elif return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}: only 'np' or None")
        if isinstance(text, str) and return_tensors is None:
            rows, masks = rows[0], masks[0]
        return {"input_ids": rows, "attention_mask": masks}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=skip_special_tokens)
        # as transformers' Metaspace decoder: the pieces joined, "▁" read as a space, the first space dropped
        special = {v: k for k, v in self._special.items()}
        pieces = [special[i] if i in special else self._sp.id_to_piece(i) for i in ids
                  if not (skip_special_tokens and i in special)]
        return "".join(pieces).replace("\u2581", " ").removeprefix(" ")

    def save_pretrained(self, folder) -> None:
        """The source folder's tokenizer files, copied (the same layout transformers writes and reads)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in _FILES:
            if (self.folder / name).exists() and (self.folder / name).resolve() != (folder / name).resolve():
                shutil.copyfile(self.folder / name, folder / name)


def load_tokenizer(folder) -> T5Tokenizer:
    """The T5 tokenizer of an HF folder (spiece.model and/or tokenizer.json)."""
    folder = Path(folder)
    if not ((folder / "spiece.model").exists() or (folder / "tokenizer.json").exists()):
        raise CheckpointError(f"{folder}: no T5 tokenizer here (expected spiece.model or tokenizer.json)")
    return T5Tokenizer(folder)


def encode_prompts(tokenizer, prompts, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """PixArt's tokenization: (input_ids, attention_mask), int32 (B, max_length), eos appended, padded/truncated.
    `tokenizer` is ours or any transformers T5 tokenizer."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    enc = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


_CORPUS = """
a photo of an astronaut riding a horse on the moon. a small white cat sitting on a red chair in a sunny garden.
an oil painting of a quiet city street at night with bright lights and rain. a cozy wooden cabin in snowy mountains.
a bowl of fresh fruit on a kitchen table, soft morning light. a portrait of an old man with a grey beard and a hat.
a futuristic car driving through a neon city, digital art. a golden retriever puppy playing with a blue ball on grass.
a watercolor landscape of green hills, a river and tall trees under a cloudy sky. a cup of hot coffee next to a book.
the quick brown fox jumps over the lazy dog. a lighthouse on a rocky coast during a storm with huge waves.
a beautiful woman wearing a long dress walking on the beach at sunset. a robot reading a newspaper in a cafe.
an ancient castle on a hill surrounded by fog, fantasy concept art, highly detailed. a plate of pasta with tomatoes.
a children's drawing of a house, a tree and the sun. a close up of a yellow flower with water drops, macro photo.
a group of friends laughing around a campfire in the forest. a black and white photograph of a train station.
a colorful bird sitting on a branch, spring, cherry blossoms. a sailing boat on a calm lake, reflection, evening.
a dragon flying over a medieval village, epic, cinematic lighting. a minimalist poster with a big orange circle.
a teddy bear wearing sunglasses, studio photo, high resolution. two kids riding bicycles down a country road.
an elephant walking in the desert under a blue sky. a pixel art scene of a tiny farm with cows and chickens.
"""


def make_tiny_tokenizer(folder, vocab_size: int = 200):
    """Train a small SentencePiece unigram model on a built-in corpus and save it in HF's T5 tokenizer layout.

    Ids follow T5: <pad> 0, </s> 1, <unk> 2; no sentinel (<extra_id_*>) tokens. Offline, well under a second.
    """
    import sentencepiece as spm
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [s.strip() + "." for s in _CORPUS.replace("\n", " ").split(".") if s.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    (folder / "spiece.model").write_bytes(model.getvalue())
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 512, **special}, indent=2))
    return folder
