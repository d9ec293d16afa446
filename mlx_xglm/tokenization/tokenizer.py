"""XGLM's tokenizer: sentencepiece pieces laid out in the fairseq dictionary's id order.

Id for id equal to transformers 4.56's slow XGLMTokenizer.
"""

from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm

from ..errors import XGLMError
from ..outputs import staged_file
from .encoding import BatchEncoding, encode_batch
from .prompt import Newlines, check_newlines
from .tokenizer_files import CONFIG_FILE, read_settings, write_configs

SPIECE_UNDERLINE = "\u2581"
VOCAB_FILE = "sentencepiece.bpe.model"
NUM_MADEUP_WORDS = 7


class XGLMTokenizer:
    """Encode text to XGLM ids and back.

    `vocab_file` is a checkpoint's `sentencepiece.bpe.model`. `sp_model_kwargs` go to sentencepiece's
    processor (e.g. `enable_sampling`, `nbest_size`, `alpha` for subword regularisation). `padding_side`
    ("left", what batched generation needs, or "right") and `truncation_side` ("right" or "left") are the
    defaults of `__call__`; `model_max_length` is the length `truncation=True` works to without a
    `max_length` (None: no limit).
    """

    bos_token, pad_token, eos_token, unk_token = "<s>", "<pad>", "</s>", "<unk>"
    bos_token_id, pad_token_id, eos_token_id, unk_token_id = 0, 1, 2, 3
    # transformers' XGLMTokenizer separates pairs with </s> and names <s> its cls token.
    sep_token, cls_token = "</s>", "<s>"
    sep_token_id, cls_token_id = 2, 0
    model_input_names = ["input_ids", "attention_mask"]
    # fairseq's dictionary puts its four specials first; sentencepiece piece i (i >= 1) becomes i + 1.
    fairseq_offset = 1

    def __init__(
        self,
        vocab_file: str | Path,
        sp_model_kwargs: dict | None = None,
        padding_side: str = "left",
        truncation_side: str = "right",
        model_max_length: int | None = None,
    ):
        vocab_file = Path(vocab_file)
        if not vocab_file.is_file():
            raise XGLMError(
                f"tokenizer file {vocab_file} not found; the checkpoint folder needs the "
                f"{VOCAB_FILE} that ships with every facebook/xglm-* repository"
            )
        self.vocab_file = vocab_file
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = model_max_length
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
        """Load from a checkpoint folder holding `sentencepiece.bpe.model`.

        `model_max_length`, `padding_side`, `truncation_side` and `sp_model_kwargs` are read from its
        `tokenizer_config.json` when present; keyword arguments override them.
        """
        path = Path(path)
        settings = read_settings(path / CONFIG_FILE)
        return cls(path / VOCAB_FILE, **{**settings, **kwargs})

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
        """The pieces of `text`, special tokens kept whole; no leading `</s>`.

        As transformers, an unknown character stays itself here (its id is `<unk>`'s).
        """
        pieces = []
        for part in self._split_special(text):
            if part in self.special_tokens_to_ids:
                pieces.append(part)
            else:
                pieces.extend(self.sp_model.encode(part, out_type=str))
        return pieces

    def encode(self, text: str, add_special_tokens: bool = True, newlines: Newlines = "space") -> list[int]:
        """Ids of `text`; with `add_special_tokens` the sequence starts with `</s>` (id 2), as fairseq's.

        `newlines="space"` (transformers) lets sentencepiece turn a newline into a space; `newlines="eos"`
        encodes each newline as `</s>`, the way XGLM saw line breaks in training.
        """
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            # A lone surrogate (Python lets "\ud800" into a str): not text, and sentencepiece cannot take it.
            raise XGLMError(
                f"text holds a lone surrogate at character {e.start}; pass valid text", param="text"
            ) from None
        if check_newlines(newlines) == "eos":
            text = text.replace("\r\n", "\n").replace("\n", self.eos_token)
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

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        """`decode` of each row of `sequences`."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in sequences]

    def get_vocab(self) -> dict[str, int]:
        """Every token and its id, special tokens included."""
        vocab = {self.convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab.update(self.special_tokens_to_ids)
        return vocab

    def build_inputs_with_special_tokens(self, ids_0: list[int], ids_1: list[int] | None = None) -> list[int]:
        """`</s> A`, or `</s> A </s> </s> B` for a pair (fairseq's layout, kept by transformers)."""
        if ids_1 is None:
            return [self.sep_token_id, *ids_0]
        return [self.sep_token_id, *ids_0, self.sep_token_id, self.sep_token_id, *ids_1]

    def get_special_tokens_mask(
        self, ids_0: list[int], ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        """1 where `build_inputs_with_special_tokens` puts a special token, 0 elsewhere.

        With `already_has_special_tokens`, `ids_0` is a finished sequence and every special id in it is
        marked (`ids_1` must then be None).
        """
        if already_has_special_tokens:
            if ids_1 is not None:
                raise XGLMError("ids_1 must be None when already_has_special_tokens=True")
            return [int(i in self.all_special_ids) for i in ids_0]
        if ids_1 is None:
            return [1] + [0] * len(ids_0)
        return [1] + [0] * len(ids_0) + [1, 1] + [0] * len(ids_1)

    def create_token_type_ids_from_sequences(
        self, ids_0: list[int], ids_1: list[int] | None = None
    ) -> list[int]:
        """All zeros, one per id of the built sequence: XGLM has no token types."""
        return [0] * len(self.build_inputs_with_special_tokens(ids_0, ids_1))

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 3 if pair else 1

    def __call__(
        self,
        text: str | list[str],
        text_pair: str | list[str] | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
    ) -> BatchEncoding:
        """Encode a text, a pair, or a batch of them, the way transformers' tokenizer call does.

        `padding`: False, True/"longest" (to the longest in the batch) or "max_length"; `padding_side`
        overrides the tokenizer's ("left" by default). `truncation`: None/False, True/"longest_first",
        "only_first" or "only_second", to `max_length` (or `model_max_length`), special tokens counted; a
        `max_length` alone truncates longest_first. `return_tensors`: None (lists), "np" or "mlx" (a single
        text then gets a batch axis). Returns a BatchEncoding with `input_ids` and `attention_mask`.
        """
        return encode_batch(
            self,
            text,
            text_pair,
            add_special_tokens=add_special_tokens,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side or self.padding_side,
            return_tensors=return_tensors,
            return_attention_mask=return_attention_mask,
        )

    def save_vocabulary(self, save_directory: str | Path, filename_prefix: str | None = None) -> tuple[str]:
        """Write the sentencepiece model into the existing `save_directory`; returns its path in a tuple."""
        folder = Path(save_directory)
        if not folder.is_dir():
            raise XGLMError(f"save_vocabulary: {folder} is not a directory")
        name = (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILE
        target = folder / name
        with staged_file(target) as work:
            work.write_bytes(self.sp_model.serialized_model_proto())
        return (str(target),)

    def save_pretrained(self, save_directory: str | Path) -> tuple[str, ...]:
        """Write the tokenizer files transformers' XGLMTokenizer.from_pretrained (and ours) load.

        `sentencepiece.bpe.model`, `tokenizer_config.json` and `special_tokens_map.json`, each written to
        a temporary file and moved into place; the folder is created when missing.
        """
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        (vocab,) = self.save_vocabulary(folder)
        return (vocab, *write_configs(self, folder))
