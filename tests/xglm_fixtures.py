"""Tiny XGLM checkpoints in the exact Hub layout, built offline.

The tokenizer is a sentencepiece BPE model trained on `mlx_xglm/checkpoints/data/multilingual.txt` (more
than ten scripts) with the ids fairseq's sentencepiece models use (unk 0, <s> 1, </s> 2, no pad). Weights
are random but drawn large, so next-token logits have wide margins and greedy decoding is stable across
implementations.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

# The tokenizer training and the weights are those of `mlx-xglm tiny` (mlx_xglm/checkpoints/tiny.py).
from mlx_xglm.checkpoints.tiny import TEXT_FILE, random_weights, train_sentencepiece  # noqa: F401

SP_PIECES = 1000
# sentencepiece pieces + <pad> (the one fairseq special sentencepiece lacks) + 7 <madeupword>s.
VOCAB_SIZE = SP_PIECES + 1 + 7

TINY = {
    "d_model": 64,
    "ffn_dim": 128,
    "num_layers": 2,
    "attention_heads": 4,
    "max_position_embeddings": 64,
}


def hub_config(**overrides) -> dict:
    """A `config.json` as transformers writes it for XGLMForCausalLM, tiny by default."""
    config = {
        "architectures": ["XGLMForCausalLM"],
        "model_type": "xglm",
        "vocab_size": VOCAB_SIZE,
        "activation_function": "gelu",
        "attention_dropout": 0.1,
        "activation_dropout": 0.0,
        "dropout": 0.1,
        "layerdrop": 0.0,
        "init_std": 0.02,
        "scale_embedding": True,
        "use_cache": True,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
        "decoder_start_token_id": 2,
        "torch_dtype": "float32",
        "transformers_version": "4.56.2",
        **TINY,
    }
    config.update(overrides)
    return config


def varied_weights(scale_embedding: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights whose greedy tokens vary: MLP outputs 64x and attention outputs 8x stronger than drawn.

    With weights as drawn, the residual stream is dominated by the input token's own (tied) embedding,
    or a few tokens attract every path, and greedy decoding repeats one token."""
    weights = random_weights(hub_config(scale_embedding=scale_embedding), seed=seed)
    for name in weights:
        if name.endswith("fc2.weight"):
            weights[name] *= 64
        elif name.endswith("out_proj.weight"):
            weights[name] *= 8
    return weights


def write_tokenizer_files(folder: Path, sp_model: Path) -> None:
    """The tokenizer files of a facebook/xglm-* repository."""
    (folder / "sentencepiece.bpe.model").write_bytes(Path(sp_model).read_bytes())
    madeup = [f"<madeupword{i}>" for i in range(7)]
    specials = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "sep_token": "</s>",
        "cls_token": "<s>",
        "pad_token": "<pad>",
        "additional_special_tokens": madeup,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    tokenizer_config = {
        **specials,
        "model_max_length": 2048,
        "sp_model_kwargs": {},
        "tokenizer_class": "XGLMTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def build_checkpoint(
    folder: Path,
    sp_model: Path,
    seed: int = 0,
    weights: dict[str, np.ndarray] | None = None,
    **config_overrides,
) -> Path:
    """Write a complete tiny checkpoint (config, safetensors weights, tokenizer files) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = hub_config(**config_overrides)
    if weights is None:
        weights = random_weights(config, seed)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer_files(folder, sp_model)
    return folder


# Texts whose ids and decoding must equal transformers': every script, whitespace, specials, unknowns.
PARITY_STRINGS = [
    "",
    " ",
    "     ",
    "\t",
    "\n",
    "\n\n\n",
    " \t\n \r\n ",
    "Hello World!",
    "  leading and trailing  ",
    "multiple     spaces    inside",
    "tabs\tand\nnewlines\r\nmixed",
    "Café naïve façade résumé",
    "Привет, мир! Москва",
    "Καλημέρα, τι κάνεις;",
    "今天天气很好，我们去公园散步吧。",
    "東京は日本の首都です。",
    "서울은 한국의 수도입니다.",
    "القاهرة هي عاصمة مصر",
    "दिल्ली भारत की राजधानी है।",
    "กรุงเทพมหานครเป็นเมืองหลวง",
    "சென்னை தமிழ்நாட்டின் தலைநகரம்",
    "emoji 😀👍🏽 and flags 🇫🇮",
    "out of vocabulary: ☃ ❄ ♞ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "mixed English русский 中文 العربية हिंदी ไทย",
    "a</s>b",
    "a </s> b",
    "x <pad> y",
    "<madeupword3>",
    "hi <madeupword3>there <madeupword6>",
    "<s>start",
    "end<unk>",
    "</s></s>",
    "<madeupword7> is not special",
    "ｆｕｌｌｗｉｄｔｈ １２３",
    "ligature ﬁ and Å versus Å",
    "numbers 3.14159, 2048 and 100%",
    "don't stop, Hello , world .",
    "<s> hi </s>",
    "zero\u200bwidth",
    "x" * 80,
]


def fill_hub_cache(hf_home, repo_id, folder):
    """Lay `folder` out as huggingface_hub's cache does after a download of `repo_id`."""
    commit = "0" * 40
    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)


def free_port() -> int:
    """A localhost TCP port nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_signals() -> None:
    """A child's `preexec_fn`: SIGINT, SIGTERM and SIGHUP back at their default actions.

    A test run started where they are ignored (a background shell ignores SIGINT, nohup SIGHUP) hands
    SIG_IGN down to its children, and Python then installs no KeyboardInterrupt handler: a test that
    signals its child would wait on a child that never hears the signal."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


@contextmanager
def child_process(args: list, **popen_kwargs):
    """`subprocess.Popen(args)` with default signal actions, killed on the way out if it still runs."""
    process = subprocess.Popen(args, preexec_fn=default_signals, **popen_kwargs)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def read_within(read, timeout: float):
    """`read()` (a pipe's `readline` or `read`), failing after `timeout` seconds.

    A pipe read has no limit of its own, so it runs in a daemon thread; once the child is killed (as
    `child_process` does on the way out) the read ends at end of file and the thread with it."""
    result = []
    thread = threading.Thread(target=lambda: result.append(read()), daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        raise TimeoutError(f"no output from the child within {timeout} s")
    return result[0]


class ServerProcess:
    """`mlx-xglm server` in a child process on a free localhost port, ready once /health answers."""

    def __init__(self, model: Path, *flags: str, startup_timeout: float = 60.0):
        import sys
        import tempfile
        import time

        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (open while the server lives)
        command = [sys.executable, "-m", "mlx_xglm.cli", "server", "--model", str(model), "--port"]
        self.process = subprocess.Popen(
            [*command, str(self.port), *flags], stderr=self.log, stdout=self.log, preexec_fn=default_signals
        )
        deadline = time.monotonic() + startup_timeout
        headers = (
            {"Authorization": f"Bearer {flags[flags.index('--api-key') + 1]}"} if "--api-key" in flags else {}
        )
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited at startup:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", headers=headers, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server did not start in {startup_timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait; returns the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout)
