"""Local lm-eval tasks for the evaluation tests: YAML configs and JSONL data written into a folder.

One task per output type: multiple_choice with few-shot examples, loglikelihood (greedy and non-greedy
targets, an empty context, a context ending in a space), loglikelihood_rolling (documents longer than the
tiny models' 64 positions) and generate_until (a stop sequence the model produces, and max_gen_toks).
"""

from __future__ import annotations

import json
from pathlib import Path

from xglm_fixtures import TEXT_FILE, hub_config, random_weights

LINES = [line for line in TEXT_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


def eval_weights() -> dict:
    """Weights whose next-token log-probabilities are moderate (about -10), so sums stay precise in
    float32, and whose greedy continuations are not one repeated token."""
    weights = random_weights(hub_config(scale_embedding=False), seed=0)
    for name in weights:
        if name.endswith(("fc2.weight", "out_proj.weight")):
            weights[name] *= 4
    weights["model.embed_tokens.weight"] *= 0.3
    return weights


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _yaml(folder: Path, name: str, body: str, splits: dict[str, str]) -> None:
    files = "".join(f"    {split}: {folder / file}\n" for split, file in splits.items())
    text = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n{files}{body}"
    (folder / f"{name}.yaml").write_text(text, encoding="utf-8")


def write_tasks(folder: Path, greedy_targets: list[tuple[str, str]], stop: str) -> list[str]:
    """Write the four tasks into `folder`; `greedy_targets` are (context, the model's greedy next word)
    pairs, `stop` a string the model generates. Returns the task names."""
    folder.mkdir(parents=True, exist_ok=True)
    train = [
        {"premise": LINES[i][:60], "choices": ["yes", "no indeed", "perhaps"], "label": i % 3}
        for i in range(6)
    ]
    test = [
        {"premise": LINES[6 + i][:50], "choices": ["oui", "non merci", "peut-être", "jamais"], "label": i % 4}
        for i in range(5)
    ]
    _jsonl(folder / "mc_train.jsonl", train)
    _jsonl(folder / "mc_test.jsonl", test)
    _yaml(
        folder,
        "tiny_mc",
        "output_type: multiple_choice\ntraining_split: train\ntest_split: test\nfewshot_split: train\n"
        'num_fewshot: 2\ndoc_to_text: "{{premise}}\\nQuestion: what follows?\\nAnswer:"\n'
        "doc_to_target: label\ndoc_to_choice: choices\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        {"train": "mc_train.jsonl", "test": "mc_test.jsonl"},
    )
    ll = [{"context": c, "target": t} for c, t in greedy_targets]
    ll += [
        {"context": LINES[1][:40], "target": "banana"},
        {"context": "", "target": "Hello world"},
        {"context": "Der schnelle braune Fuchs ", "target": "springt"},
        {"context": LINES[3] + " " + LINES[4], "target": "and then some more words"},
    ]
    _jsonl(folder / "ll_test.jsonl", ll)
    _yaml(
        folder,
        "tiny_ll",
        'output_type: loglikelihood\ntest_split: test\ndoc_to_text: "{{context}}"\n'
        'doc_to_target: "{{target}}"\nmetric_list:\n  - metric: perplexity\n  - metric: acc\n',
        {"test": "ll_test.jsonl"},
    )
    docs = [" ".join(LINES[:6]), LINES[7], " ".join(LINES[8:11])]
    _jsonl(folder / "rolling_test.jsonl", [{"text": d} for d in docs])
    _yaml(
        folder,
        "tiny_rolling",
        'output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: ""\n'
        'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
        "  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
        {"test": "rolling_test.jsonl"},
    )
    gen = [{"context": LINES[i][: 20 + 15 * i], "target": "x"} for i in range(5)]
    _jsonl(folder / "gen_test.jsonl", gen)
    _yaml(
        folder,
        "tiny_gen",
        'output_type: generate_until\ntest_split: test\ndoc_to_text: "{{context}}"\n'
        f'doc_to_target: "{{{{target}}}}"\ngeneration_kwargs:\n  until: [{json.dumps(stop)}, "\\n\\n"]\n'
        "  max_gen_toks: 12\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n",
        {"test": "gen_test.jsonl"},
    )
    return ["tiny_mc", "tiny_ll", "tiny_rolling", "tiny_gen"]
