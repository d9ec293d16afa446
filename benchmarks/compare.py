"""Side by side: mlx-xglm against mlx-lm's GPT-2 at XGLM's widths and transformers + torch running XGLM.

Not part of the test suite. Every implementation gets random weights of the same shape; trials alternate
between implementations, each trial in a fresh process, so that machine noise hits all of them alike and
no library's idle threads slow down another. Appends a markdown table to --output.

    python benchmarks/compare.py --preset 564M --prompt-tokens 128 --gen-tokens 32 --trials 3
    python benchmarks/compare.py --preset 564M --baseline ../main --no-torch    # against another checkout
    python benchmarks/compare.py --preset small --in-process --no-torch --trials 9

`--preset small` is the overhead-bound shape (d_model 64, 4 heads, ffn 256, vocab 512, 24 layers, 16-token
prompt, 128 tokens): each step's arithmetic is tiny, so the time per token is the host's work of building
and running the graph, which is what bounds small models on Apple-silicon GPUs. `--in-process` builds each
implementation once and alternates the trials in this process; `--baseline DIR` adds mlx-xglm as checked
out in DIR (e.g. the main branch), imported from there in its own worker processes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_xglm import bench
from mlx_xglm.bench import PRESETS, random_model, run_trial

SMALL = {"num_layers": 24, "d_model": 64, "ffn_dim": 256, "attention_heads": 4, "vocab_size": 512}
SHAPES = {**PRESETS, "small": SMALL}
VOCAB_SIZE = 256008


def mlx_lm_runner(shape: dict, dtype: str, q_bits: int | None, q_group_size: int):
    """mlx-lm's GPT-2 (pre-LN, GELU MLP, tied embedding) at XGLM's widths, driven by mlx-lm's loop."""
    import mlx.nn as nn
    from mlx_lm.generate import generate_step
    from mlx_lm.models import gpt2

    args = gpt2.ModelArgs(
        model_type="gpt2",
        n_ctx=2048,
        n_embd=shape["d_model"],
        n_head=shape["attention_heads"],
        n_layer=shape["num_layers"],
        n_positions=2048,
        layer_norm_epsilon=1e-5,
        vocab_size=shape.get("vocab_size", VOCAB_SIZE),
    )
    model = gpt2.Model(args)
    model.set_dtype(getattr(mx, dtype))
    if q_bits:
        nn.quantize(model, group_size=q_group_size, bits=q_bits)
    mx.eval(model.parameters())

    def trial(prompt_tokens, gen_tokens):
        t = run_trial(model, prompt_tokens, gen_tokens, args.vocab_size, step=generate_step)
        return t.prompt_tps, t.generation_tps, t.peak_memory

    return trial


def mlx_xglm_runner(preset: str, layers: int, dtype: str, q_bits: int | None, q_group_size: int):
    # Registered with the library so that random_model of any checkout (this one or --baseline's) builds it.
    bench.PRESETS.setdefault(preset, SHAPES[preset])
    model = random_model(preset, layers, dtype, q_bits, q_group_size)

    def trial(prompt_tokens, gen_tokens):
        t = run_trial(model, prompt_tokens, gen_tokens, model.config.vocab_size)
        return t.prompt_tps, t.generation_tps, t.peak_memory

    return trial


def torch_runner(shape: dict, dtype: str):
    """transformers' XGLMForCausalLM on torch's CPU backend, greedy with its KV cache."""
    import torch
    import transformers

    config = transformers.XGLMConfig(**{"vocab_size": VOCAB_SIZE, **shape})
    model = transformers.XGLMForCausalLM(config).eval().to(getattr(torch, dtype))

    @torch.no_grad()
    def trial(prompt_tokens, gen_tokens):
        ids = torch.randint(4, config.vocab_size, (1, prompt_tokens))
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        first = time.perf_counter()
        past = out.past_key_values
        for _ in range(gen_tokens - 1):
            out = model(token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        end = time.perf_counter()
        return prompt_tokens / (first - start), (gen_tokens - 1) / (end - first), None

    return trial


IMPLEMENTATIONS = ["mlx-xglm", "mlx-lm GPT-2, same widths", "transformers + torch, XGLM"]
BASELINE = "mlx-xglm, --baseline"


def runner(name: str, args):
    """Build one implementation; returns `trial(prompt_tokens, gen_tokens) -> (prompt, decode, peak)`."""
    shape = dict(SHAPES[args.preset])
    if args.layers:
        shape["num_layers"] = args.layers
    if name in (IMPLEMENTATIONS[0], BASELINE):
        return mlx_xglm_runner(args.preset, args.layers, args.dtype, args.q_bits, args.q_group_size)
    if name == IMPLEMENTATIONS[1]:
        return mlx_lm_runner(shape, args.dtype, args.q_bits, args.q_group_size)
    return torch_runner(shape, args.dtype)


def worker(args) -> None:
    """Build one implementation, warm it up, time one trial, print the result as JSON."""
    run = runner(args.worker, args)
    run(min(args.prompt_tokens, 16), 2)
    print(json.dumps(run(args.prompt_tokens, args.gen_tokens)), flush=True)
    # With Debian's OpenBLAS preloaded, its thread shutdown at interpreter exit can deadlock once its
    # pool has run MLX's matmuls; the result is out, so leave without running exit handlers.
    os._exit(0)


def run_worker(name: str, args) -> tuple:
    env = dict(os.environ)
    if name == IMPLEMENTATIONS[2]:
        # torch brings its own BLAS; a preloaded OpenBLAS meant for MLX would fight it for the cores.
        env.pop("LD_PRELOAD", None)
    if name == BASELINE:
        # The baseline checkout's package comes first on the path, ahead of this one's install.
        env["PYTHONPATH"] = os.pathsep.join([str(args.baseline.resolve()), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", name],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=args.baseline if name == BASELINE else None,
    )
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def available(name: str, args) -> bool:
    if name == BASELINE:
        return args.baseline is not None
    module = {IMPLEMENTATIONS[1]: "mlx_lm", IMPLEMENTATIONS[2]: "transformers"}.get(name)
    if name == IMPLEMENTATIONS[2] and (args.no_torch or args.q_bits):
        return False
    if module and importlib.util.find_spec(module) is None:
        print(f"{module} is not installed: skipping {name}")
        return False
    return True


def alternating_trials(script: str, args: argparse.Namespace, passed: tuple[str, ...], *extra: str) -> dict:
    """Run `script --backend mlx|torch` in fresh processes, alternating which goes first, `args.trials`
    times; torch runs without the LD_PRELOAD meant for MLX. Returns each backend's parsed JSON last lines.

    `passed` names the options of `args` handed on to the workers; `extra` are further worker flags.
    """
    results = {"mlx": [], "torch": []}
    for trial in range(args.trials):
        for backend in ("mlx", "torch") if trial % 2 == 0 else ("torch", "mlx"):
            env = dict(os.environ)
            if backend == "torch":
                env.pop("LD_PRELOAD", None)
            command = [sys.executable, script, "--backend", backend, *extra]
            command += [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in passed and v is not None
            ]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=3600)
            results[backend].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"trial {trial + 1} {backend}: {results[backend][-1]}", flush=True)
    return results


def paired_ratios(results: dict, speed) -> list[float]:
    """Each trial's mlx-xglm speed over the torch run next to it (`speed(result)`: higher is faster).

    This machine's speed drifts by up to 1.5x within minutes; the two runs of a trial are adjacent in
    time, so their ratio keeps less of the drift than the ratio of the two medians."""
    return [speed(m) / speed(t) for m, t in zip(results["mlx"], results["torch"], strict=True)]


def describe_ratios(ratios: list[float]) -> str:
    shown = ", ".join(f"{r:.2f}" for r in ratios)
    ahead = sum(r > 1 for r in ratios)
    return f"per trial {shown}; median {statistics.median(ratios):.2f}x, ahead in {ahead} of {len(ratios)}"


def append_table(output: Path, rows: list[str]) -> None:
    """Append a table's lines to the results file `output` and print them."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("a", encoding="utf-8") as f:
        f.write("\n".join(rows) + "\n\n")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # The released shapes and the overhead-bound small one: the peers here use the released vocabulary.
    parser.add_argument("--preset", choices=[p for p in SHAPES if p != "tiny"], default="564M")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--q-bits", type=int)
    parser.add_argument("--q-group-size", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, help="default: 16 for small, else 128")
    parser.add_argument("--gen-tokens", type=int, help="default: 128 for small, else 32")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true", help="skip transformers + torch")
    parser.add_argument(
        "--baseline", type=Path, metavar="DIR", help="also time mlx-xglm as checked out in DIR"
    )
    parser.add_argument(
        "--in-process", action="store_true", help="alternate the trials in this process (not with --baseline)"
    )
    parser.add_argument("--output", type=Path, default=Path("benchmarks/RESULTS.md"))
    parser.add_argument("--worker", choices=[*IMPLEMENTATIONS, BASELINE], help=argparse.SUPPRESS)
    args = parser.parse_args()
    small = args.preset == "small"
    args.prompt_tokens = args.prompt_tokens or (16 if small else 128)
    args.gen_tokens = args.gen_tokens or (128 if small else 32)
    if args.worker:
        worker(args)
        return
    if args.in_process and args.baseline:
        parser.error("--baseline runs in worker processes; drop --in-process")

    names = [name for name in [*IMPLEMENTATIONS, BASELINE] if available(name, args)]
    results = {name: [] for name in names}
    in_process = {}
    for name in names if args.in_process else ():
        in_process[name] = runner(name, args)
        in_process[name](min(args.prompt_tokens, 16), 2)
    for i in range(args.trials):
        # By default each trial runs in a fresh process, so no library's idle threads (OpenBLAS, OpenMP)
        # or caches slow down the next one; the order rotates so that no implementation always goes first.
        for name in names[i % len(names) :] + names[: i % len(names)]:
            if args.in_process:
                prompt_tps, gen_tps, peak = in_process[name](args.prompt_tokens, args.gen_tokens)
            else:
                prompt_tps, gen_tps, peak = run_worker(name, args)
            results[name].append((prompt_tps, gen_tps, peak))
            print(f"trial {i + 1} {name}: prompt {prompt_tps:.1f} tok/s, generation {gen_tps:.2f} tok/s")

    shape = dict(SHAPES[args.preset], **({"num_layers": args.layers} if args.layers else {}))
    ours = statistics.median(r[1] for r in results["mlx-xglm"])
    ours_prompt = statistics.median(r[0] for r in results["mlx-xglm"])
    where = "in one process" if args.in_process else "each in a fresh process"
    title = (
        f"{args.preset} shapes"
        if not small
        else "small widths (d_model 64, ffn 256, vocab 512; overhead-bound)"
    )
    baseline = f"; baseline: {args.baseline}" if args.baseline else ""
    rows = [
        f"{title} ({shape['num_layers']} layers), {args.dtype}"
        + (f", {args.q_bits}-bit g{args.q_group_size}" if args.q_bits else "")
        + f", {args.prompt_tokens}-token prompt, {args.gen_tokens} generated tokens, median of "
        f"{args.trials} alternating trials, {where}{baseline}; {platform.machine()} "
        f"{platform.system()}, MLX {mx.__version__} on {mx.default_device()}",
        "",
        "| implementation | prompt tok/s | decode tok/s | peak memory (GB) | prompt vs ours | decode vs ours "
        "|",
        "|---|---|---|---|---|---|",
    ]
    for name, values in results.items():
        prompt = statistics.median(v[0] for v in values)
        gen = statistics.median(v[1] for v in values)
        peaks = [v[2] for v in values if v[2] is not None]
        peak = f"{max(peaks):.2f}" if peaks else "n/a"
        ratios = f"{prompt / ours_prompt:.2f}x | {gen / ours:.2f}x"
        rows.append(f"| {name} | {prompt:.1f} | {gen:.2f} | {peak} | {ratios} |")
    append_table(args.output, rows)


if __name__ == "__main__":
    main()
