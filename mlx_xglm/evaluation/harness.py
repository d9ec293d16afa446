"""lm-evaluation-harness adapter: an `lm_eval.api.model.LM` registered as `mlx-xglm`.

By default it reproduces `lm_eval --model hf` on the same checkpoint: the same context/continuation split,
the same `<s>` prefix for empty contexts and rolling windows, windows of `max_position_embeddings`, left
truncation, stop sequences and `max_gen_toks`. `newlines="eos"` reads every newline (in contexts,
continuations and few-shot separators) as `</s>`, as in XGLM's training data.
"""

from __future__ import annotations

import json

import mlx.core as mx
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from mlx.utils import tree_flatten

from ..checkpoints import load
from ..decoding import batch_generate, make_sampler
from ..errors import XGLMError
from ..tokenization import Newlines, check_newlines
from .distributed import run_sharded
from .progress import request_progress
from .scoring import encode_pair, loglikelihood_tokens

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's hf backend default
HF_TOP_K = 50  # transformers' sampling default, which lm-eval's hf backend inherits


@register_model("mlx-xglm")
class XGLMEvalModel(LM):
    """An XGLM model for lm-eval: `lm_eval --model mlx-xglm --model_args pretrained=PATH,newlines=eos`.

    `pretrained` is a folder or Hub repo id (or pass `model` and `tokenizer` already loaded), with
    `adapter_path` a PEFT LoRA adapter folder applied to it;
    `batch_size` continuations or prompts per forward pass; `newlines` "space" (default, as transformers)
    or "eos"; `max_length` the window (default `max_position_embeddings`); `seed` for sampled generation
    (each batch seeds `seed + batch index`, so results do not depend on the number of processes).
    """

    def __init__(
        self,
        pretrained: str = "facebook/xglm-564M",
        revision: str | None = None,
        adapter_path: str | None = None,
        batch_size: int | str = 16,
        newlines: Newlines = "space",
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        seed: int = 1234,
        model=None,
        tokenizer=None,
        group=None,
        max_batch_size: int | None = None,  # lm-eval passes these two to every backend; MLX picks its device
        device: str | None = None,
    ):
        super().__init__()
        check_newlines(newlines)
        try:
            self.batch_size = int(batch_size if batch_size is not None else 16)
        except ValueError:
            raise XGLMError(f"batch_size must be a number, got {batch_size!r}", param="batch_size") from None
        if self.batch_size < 1:
            raise XGLMError(f"batch_size must be 1 or more, got {self.batch_size}", param="batch_size")
        if model is None:
            model, tokenizer = load(pretrained, revision=revision, adapter_path=adapter_path)
        self.model, self.tokenizer = model, tokenizer
        self.pretrained, self.adapter_path = pretrained, adapter_path
        self.newlines = newlines
        self.max_length = int(max_length or model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.group = group

    @property
    def prefix_token_id(self) -> int:
        # lm-eval's hf backend prefixes empty contexts and rolling windows with the tokenizer's bos (<s>).
        return self.tokenizer.bos_token_id

    def get_model_info(self) -> dict:
        """Recorded in lm-eval's results `config`."""
        count = sum(v.size for _, v in tree_flatten(self.model.parameters()))
        return {"model_num_parameters": count, "newlines": self.newlines, "max_length": self.max_length}

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, newlines=self.newlines)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [
            encode_pair(self.tokenizer, c, x, newlines=self.newlines, prefix_token_id=self.prefix_token_id)
            for c, x in (r.args for r in requests)
        ]
        return loglikelihood_tokens(
            self.model,
            pairs,
            batch_size=self.batch_size,
            max_length=self.max_length,
            verbose=not disable_tqdm,
            group=self.group,
        )

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for pair in get_rolling_token_windows(
                token_list=self._encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append(make_disjoint_window(pair))
                owners.append(i)
        scores = loglikelihood_tokens(
            self.model,
            windows,
            batch_size=self.batch_size,
            max_length=self.max_length,
            verbose=not disable_tqdm,
            group=self.group,
        )
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owners, scores, strict=True):
            totals[i] += lp
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        by_kwargs: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            by_kwargs.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        batches = []
        for members in by_kwargs.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            max_ctx = self.max_length - kwargs["max_gen_toks"]
            if max_ctx < 1:
                raise XGLMError(
                    f"max_gen_toks ({kwargs['max_gen_toks']}) must be less than the model's window "
                    f"({self.max_length})",
                    param="max_gen_toks",
                )
            prompts = {i: self._encode(requests[i].args[0])[-max_ctx:] for i in members}
            members = sorted(members, key=lambda i: (-len(prompts[i]), i))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                batches.append((kwargs, [(i, prompts[i]) for i in chunk]))

        def work(index, batch):
            kwargs, rows = batch
            return self._generate(index, dict(kwargs), [ids for _, ids in rows])

        with request_progress("Generating", len(requests), not disable_tqdm, self.group) as advance:
            results = run_sharded(batches, work, self.group, lambda b: advance(len(b[1])))
        out: list[str | None] = [None] * len(requests)
        for (_, rows), texts in zip(batches, results, strict=True):
            for (i, _), text in zip(rows, texts, strict=True):
                out[i] = text
        return out

    def _generate(self, index: int, kwargs: dict, prompts: list[list[int]]) -> list[str]:
        eos = self.tokenizer.eos_token
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        sampler = None
        if kwargs.get("do_sample"):
            mx.random.seed(self.seed + index)
            sampler = make_sampler(
                temp=float(kwargs.get("temperature") or 1.0),
                top_p=float(kwargs.get("top_p", 1.0)),
                top_k=int(kwargs.get("top_k", HF_TOP_K)),
            )
        response = batch_generate(
            self.model,
            self.tokenizer,
            prompts,
            max_tokens=kwargs["max_gen_toks"],
            sampler=sampler,
            stop=[s for s in until if s != eos],
            newlines=self.newlines,
        )
        return [postprocess_generated_text(self._decode(ids), until, None) for ids in response.token_ids]

    def _decode(self, ids: list[int]) -> str:
        if self.newlines == "space":
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        lines, line = [], []
        for token in ids:
            if token == self.tokenizer.eos_token_id:
                lines.append(line)
                line = []
            else:
                line.append(token)
        return "\n".join(self.tokenizer.decode(x, skip_special_tokens=True) for x in [*lines, line])
