"""Scoring speed, and the cost of candidates that share a context, measured side by side.

In one process, alternating trials of:
  context   one forward of a CONTEXT-token context (the LM head on its last position only)
  shared    4 candidates of CANDIDATE tokens scored after that context (`loglikelihood_tokens`: the context
            read once, its KV cache copied to the candidates)
  unshared  the same 4 candidates as 4 whole sequences in one padded batch (no reuse)
  score     TEXTS texts of CONTEXT tokens scored at every position (`score`'s forward): tokens/s

    python benchmarks/scoring.py --preset tiny
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python benchmarks/scoring.py --preset 564M --trials 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import mlx.core as mx

from mlx_xglm.bench import random_model
from mlx_xglm.evaluation import loglikelihood_tokens
from mlx_xglm.evaluation.forward import sequence_logprobs
from mlx_xglm.model.xglm import XGLMConfig, XGLMForCausalLM

# The tests' tiny checkpoint shape (tests/xglm_fixtures.py), with room for a 256-token context.
TINY = {"d_model": 64, "ffn_dim": 128, "num_layers": 2, "attention_heads": 4, "vocab_size": 1008}


def build(preset: str) -> XGLMForCausalLM:
    if preset != "tiny":
        return random_model(preset)
    model = XGLMForCausalLM(XGLMConfig(**TINY))
    mx.eval(model.parameters())
    model.eval()
    return model


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="tiny, or a released shape such as 564M")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--candidate", type=int, default=8)
    parser.add_argument("--texts", type=int, default=8)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    model = build(args.preset)
    vocab = model.config.vocab_size
    context = [2] + mx.random.randint(4, vocab, (args.context - 1,)).tolist()
    candidates = [mx.random.randint(4, vocab, (args.candidate,)).tolist() for _ in range(4)]
    texts = [[2] + mx.random.randint(4, vocab, (args.context - 1,)).tolist() for _ in range(args.texts)]

    def context_forward():
        mx.eval(model(mx.array([context]), logits_to_keep=1))

    runs = {
        "context": context_forward,
        "shared": lambda: loglikelihood_tokens(model, [(context, c) for c in candidates], max_length=4096),
        "unshared": lambda: sequence_logprobs(model, [context + c for c in candidates]),
        "score": lambda: sequence_logprobs(model, texts),
    }
    context_forward()  # warm up
    times = {name: [] for name in runs}
    for _ in range(args.trials):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    med = {name: statistics.median(t) for name, t in times.items()}
    blas = "OpenBLAS preloaded" if "openblas" in os.environ.get("LD_PRELOAD", "") else "reference BLAS"
    print(f"preset {args.preset}, {mx.default_device()}, {blas}, median of {args.trials} trials")
    print(f"context forward ({args.context} tokens): {med['context']:.3f} s")
    for name in ("shared", "unshared"):
        print(
            f"4 candidates x {args.candidate} tokens, {name}: {med[name]:.3f} s = "
            f"{med[name] / med['context']:.2f}x the context forward"
        )
    n = args.texts * args.context
    print(f"score: {n / med['score']:.1f} tokens/s ({args.texts} x {args.context} tokens)")
    # A preloaded OpenBLAS can hang at exit (docs/performance.md); the output is complete.
    os._exit(0)


if __name__ == "__main__":
    main()
