"""Generation across processes: tokens/s and each rank's peak memory, 1 process against 2 ring ranks
(tensor parallel and pipelined), at XGLM-564M's widths (d_model 1024, 16 heads, vocabulary 256,008).

Not part of the test suite. It writes a random-weight float32 checkpoint with `--layers` layers (24 is the
real 564M), then runs greedy generation in each arrangement, every rank in a fresh process started by
`mlx.launch --backend ring` on localhost, and prints a table (appended to `--output` when given).

    python benchmarks/distributed.py --layers 2 --tokens 32

Two ranks on one machine show that the split is right and what memory each rank needs; they cannot show
the speed of two machines: both ranks share this machine's cores and memory bandwidth, and the ring
backend's polling keeps a core busy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
PROMPT = list(range(4, 36))


def write_checkpoint(folder: Path, layers: int) -> Path:
    """A random-weight float32 checkpoint of 564M's widths with `layers` layers (the tiny tokenizer)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_xglm import XGLMConfig, XGLMForCausalLM
    from mlx_xglm.checkpoints import write_tiny_checkpoint

    path = write_tiny_checkpoint(folder / "model")
    config = json.loads((path / "config.json").read_text())
    config.update(d_model=1024, attention_heads=16, ffn_dim=4096, vocab_size=256008, num_layers=layers)
    config["max_position_embeddings"] = 2048
    (path / "config.json").write_text(json.dumps(config, indent=2))
    mx.random.seed(0)
    model = XGLMForCausalLM(XGLMConfig.from_dict(config))
    weights = {k: v * 0.1 for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path


def worker(model: str, out: str, mode: str, tokens: int) -> None:
    """One rank: load (sharded unless `mode` is one), generate greedily, write its figures."""
    import mlx.core as mx

    from mlx_xglm import generate_step, load, sharded_load

    group = mx.distributed.init()
    start = time.perf_counter()
    if mode == "one":
        model_, _ = load(model)
    else:
        model_, _ = sharded_load(model, **{f"{mode}_group": group})
    loaded = time.perf_counter() - start
    # Ids, not text: the tokenizer is the tiny one, the vocabulary 564M's.
    steps = generate_step(mx.array(PROMPT), model_, max_tokens=tokens)
    start = time.perf_counter()
    next(steps)
    first = time.perf_counter()
    generated = 1 + sum(1 for _ in steps)
    end = time.perf_counter()
    mx.synchronize()
    mx.eval(mx.distributed.all_sum(mx.array(0), group=group, stream=mx.cpu))
    figures = {
        "load_s": loaded,
        "prompt_tps": len(PROMPT) / (first - start),
        "generation_tps": (generated - 1) / (end - first),
        "peak_gb": mx.get_peak_memory() / 1e9,
    }
    (Path(out) / f"{mode}-{group.rank()}.json").write_text(json.dumps(figures))


def launch(ranks: int) -> list[str]:
    if ranks == 1:
        return []
    script = Path(sys.executable).parent / "mlx.launch"
    return [str(script), "--backend", "ring", "-n", str(ranks), "--starting-port", "42311", "--"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "OUT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.tokens)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = write_checkpoint(Path(tmp), args.layers)
        rows = [
            f"Generation across processes, 564M widths, {args.layers} layers, float32, "
            f"{len(PROMPT)}-token prompt, {args.tokens} tokens (load average {_load()})",
            "",
            "| arrangement | rank | prompt tok/s | generation tok/s | peak memory (GB) | load (s) |",
            "|---|---|---|---|---|---|",
        ]
        for mode, ranks in (("one", 1), ("tensor", 2), ("pipeline", 2)):
            command = [sys.executable, __file__, "--tokens", str(args.tokens), "--worker", model, tmp, mode]
            subprocess.run([*launch(ranks), *map(str, command)], check=True, cwd=HERE, timeout=900)
            for rank in range(ranks):
                f = json.loads((Path(tmp) / f"{mode}-{rank}.json").read_text())
                rows.append(
                    f"| {mode if ranks > 1 else '1 process'} | {rank} | {f['prompt_tps']:.1f} | "
                    f"{f['generation_tps']:.1f} | {f['peak_gb']:.3f} | {f['load_s']:.1f} |"
                )
    rows.append(f"\nload average after: {_load()}")
    print("\n".join(rows))
    if args.output:
        with args.output.open("a", encoding="utf-8") as f:
            f.write("\n".join(rows) + "\n\n")


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


if __name__ == "__main__":
    main()
