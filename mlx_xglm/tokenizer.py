"""XGLM's tokenizer: sentencepiece pieces laid out in the fairseq dictionary's id order.

Id for id equal to transformers 4.56's slow XGLMTokenizer.
"""

from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm

from .errors import XGLMError

SPIECE_UNDERLINE = "\u2581"
VOCAB_FILE = "sentencepiece.bpe.model"
NUM_MADEUP_WORDS = 7


class XGLMTokenizer:
    """Encode text to XGLM ids and back.

    `vocab_file` is a checkpoint's `sentencepiece.bpe.model`. `sp_model_kwargs` go to sentencepiece's
    processor (e.g. `enable_sampling`, `nbest_size`, `alpha` for subword regularisation).
    """

    bos_token, pad_token, eos_token, unk_token = "<s>", "<pad>", "</s>", "<unk>"
    bos_token_id, pad_token_id, eos_token_id, unk_token_id = 0, 1, 2, 3
    # fairseq's dictionary puts its four specials first; sentencepiece piece i (i >= 1) becomes i + 1.
    fairseq_offset = 1

    def __init__(self, vocab_file: str | Path, sp_model_kwargs: dict | None = None):
        vocab_file = Path(vocab_file)
        if not vocab_file.is_file():
            raise XGLMError(
                f"tokenizer file {vocab_file} not found; the checkpoint folder needs the "
                f"{VOCAB_FILE} that ships with every facebook/xglm-* repository"
            )
        self.vocab_file = vocab_file
        self.sp_model_kwargs = dict(sp_model_kwargs or {})
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        try:
            self.sp_model.Load(str(vocab_file))
        except (OSError, RuntimeError) as e:
            raise XGLMError(f"{vocab_file} is not a readable sentencepiece model: {e}") from None
        n_pieces = self.sp_model.get_piece_size()
        self.madeup_words = [f"<madeupword{i}>" for i in range(NUM_MADEUP_WORDS)]
        self.special_tokens_to_ids = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        for i, word in enumerate(self.madeup_words):
            self.special_tokens_to_ids[word] = n_pieces + self.fairseq_offset + i
        self.ids_to_special_tokens = {v: k for k, v in self.special_tokens_to_ids.items()}
        self.all_special_ids = set(self.ids_to_special_tokens)
        self._n_pieces = n_pieces
        names = sorted(self.special_tokens_to_ids, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> XGLMTokenizer:
        """Load from a checkpoint folder holding `sentencepiece.bpe.model`."""
        return cls(Path(path) / VOCAB_FILE, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self._n_pieces + self.fairseq_offset + NUM_MADEUP_WORDS

    def __len__(self) -> int:
        return self.vocab_size

    def _split_special(self, text: str) -> list[str]:
        # Like transformers' slow tokenizers: literal special tokens become their own pieces and the
        # whitespace on both sides of them is dropped.
        parts = self._special_re.split(text)
        for i, part in enumerate(parts):
            if part in self.special_tokens_to_ids:
                if i > 0:
                    parts[i - 1] = parts[i - 1].rstrip()
                if i + 1 < len(parts):
                    parts[i + 1] = parts[i + 1].lstrip()
        return [p for p in parts if p]

    def _piece_ids(self, text: str) -> list[int]:
        # sentencepiece's unknown piece (0) maps to <unk> (3); every other piece shifts by one.
        return [
            i + self.fairseq_offset if i else self.unk_token_id
            for i in self.sp_model.encode(text, out_type=int)
        ]

    def tokenize(self, text: str) -> list[str]:
        """The pieces of `text`, special tokens kept whole; no leading `</s>`."""
        return self.convert_ids_to_tokens(self.encode(text, add_special_tokens=False))

    def encode(self, text: str, add_special_tokens: bool = True, newlines: str = "space") -> list[int]:
        """Ids of `text`; with `add_special_tokens` the sequence starts with `</s>` (id 2), as fairseq's.

        `newlines="space"` (transformers) lets sentencepiece turn a newline into a space; `newlines="eos"`
        encodes each newline as `</s>`, the way XGLM saw line breaks in training.
        """
        if newlines == "eos":
            text = text.replace("\r\n", "\n").replace("\n", self.eos_token)
        elif newlines != "space":
            raise ValueError(f"newlines must be 'space' or 'eos', got {newlines!r}")
        ids = [self.eos_token_id] if add_special_tokens else []
        for part in self._split_special(text):
            if part in self.special_tokens_to_ids:
                ids.append(self.special_tokens_to_ids[part])
            else:
                ids.extend(self._piece_ids(part))
        return ids

    def convert_token_to_id(self, token: str) -> int:
        if token in self.special_tokens_to_ids:
            return self.special_tokens_to_ids[token]
        piece = self.sp_model.piece_to_id(token)
        return piece + self.fairseq_offset if piece else self.unk_token_id

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.convert_token_to_id(tokens)
        return [self.convert_token_to_id(t) for t in tokens]

    def convert_id_to_token(self, index: int) -> str:
        if index in self.ids_to_special_tokens:
            return self.ids_to_special_tokens[index]
        if not 0 <= index < self.vocab_size:
            raise XGLMError(f"token id {index} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self.sp_model.id_to_piece(index - self.fairseq_offset)

    def convert_ids_to_tokens(
        self, ids: int | list[int], skip_special_tokens: bool = False
    ) -> str | list[str]:
        if isinstance(ids, int):
            return self.convert_id_to_token(ids)
        return [
            self.convert_id_to_token(int(i))
            for i in ids
            if not (skip_special_tokens and int(i) in self.all_special_ids)
        ]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens).replace(SPIECE_UNDERLINE, " ").strip()

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list of ints or an array); special tokens dropped with `skip_special_tokens`."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        tokens = self.convert_ids_to_tokens(list(ids), skip_special_tokens=skip_special_tokens)
        return self.convert_tokens_to_string(tokens)
