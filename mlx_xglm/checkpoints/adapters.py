"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor names are PEFT's for XGLMForCausalLM
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so an adapter written here loads with
`PeftModel.from_pretrained` on transformers' model, and one that peft wrote loads here. The adapted modules
are read from the tensor names; `lora_alpha`, `use_rslora` and `alpha_pattern` give each module's scaling
as peft computes it (the rank is the tensors' own).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..errors import XGLMError
from ..model.lora import LoRALinear
from ..outputs import save_safetensors, staged_file
from .adapter_checks import check_weights, config_problem
from .hub import looks_like_repo_id, resolve_model_path
from .json_files import read_json_object
from .torch_bin import read_torch_bin

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# The Linear layers of an XGLM decoder layer, as transformers names them.
TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
_TENSOR = re.compile(r"(?P<path>.+)\.(?P<part>lora_A|lora_B)(?:\.default)?\.weight$")


@dataclass
class LoraConfig:
    """The fields of PEFT's LoraConfig that define an adapter of XGLM's Linear layers.

    `r` rank, `lora_alpha` (scaling = lora_alpha / r, or / sqrt(r) with `use_rslora`), `lora_dropout`,
    `target_modules` (names of Linear layers inside each decoder layer), `layers_to_transform` (layer
    indices, None for all), `base_model_name_or_path` (informational), `rank_pattern` / `alpha_pattern`
    (per-module overrides keyed by name suffix, as in peft).
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(TARGETS))
    layers_to_transform: list[int] | None = None
    base_model_name_or_path: str | None = None
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def scaling(self, path: str, r: int) -> float:
        """peft's scaling of the module at `path` with rank `r`."""
        key = _pattern_key(self.alpha_pattern, path)
        alpha = self.alpha_pattern[key] if key is not None else self.lora_alpha
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def rank(self, path: str) -> int:
        """peft's rank of the module at `path`: its `rank_pattern` entry, else `r`."""
        key = _pattern_key(self.rank_pattern, path)
        return self.rank_pattern[key] if key is not None else self.r

    def to_peft(self) -> dict:
        """The adapter_config.json that peft's `PeftModel.from_pretrained` reads."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": list(self.target_modules),
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": "layers" if self.layers_to_transform is not None else None,
            "use_rslora": self.use_rslora,
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "use_dora": False,
            "lora_bias": False,
            "revision": None,
        }


def _pattern_key(patterns: dict, path: str) -> str | None:
    # peft's get_pattern_key: a key matches a module whose name ends with it at a dot boundary.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


def read_config(file: Path) -> LoraConfig:
    """A LoraConfig from an `adapter_config.json`, refusing adapters this package cannot apply."""
    raw = read_json_object(file)
    if raw.get("peft_type", "LORA") != "LORA":
        raise XGLMError(f"{file}: peft_type {raw['peft_type']!r}; only LoRA adapters are supported")
    unsupported = {
        "use_dora": (False, None),
        "bias": ("none", None),
        "lora_bias": (False, None),
        "fan_in_fan_out": (False, None),
        "modules_to_save": (None, []),
        "layer_replication": (None, []),
        "trainable_token_indices": (None, {}, []),
    }
    for key, allowed in unsupported.items():
        if raw.get(key) not in allowed:
            raise XGLMError(f"{file}: {key}={raw[key]!r} is not supported; mlx-xglm applies plain LoRA only")
    known = LoraConfig.__dataclass_fields__
    values = {k: v for k, v in raw.items() if k in known and v is not None}
    config = LoraConfig(**values)
    config.rank_pattern = config.rank_pattern or {}
    config.alpha_pattern = config.alpha_pattern or {}
    problem = config_problem(config)
    if problem is not None:
        raise XGLMError(f"{file}: {problem}; fix the adapter's config", param="adapter_path")
    return config


def _adapter_folder(adapter_path: str | Path) -> Path:
    path = Path(adapter_path).expanduser()
    if path.is_file():
        raise XGLMError(f"adapter_path {path} is a file; pass the folder that holds it", param="adapter_path")
    if not path.is_dir() and not looks_like_repo_id(str(adapter_path)):
        raise XGLMError(f"adapter_path {path} does not exist", param="adapter_path")
    return resolve_model_path(adapter_path, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, LEGACY_WEIGHTS_FILE])


def read_adapter(adapter_path: str | Path) -> tuple[LoraConfig, dict[str, dict[str, mx.array]]]:
    """The config and, per adapted module path, its `lora_A` and `lora_B` arrays, from a folder or a
    Hub repo id holding a PEFT LoRA adapter."""
    folder = _adapter_folder(adapter_path)
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise XGLMError(f"{config_file} not found; an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = read_config(config_file)
    return config, read_adapter_weights(folder)


def read_adapter_weights(path: Path) -> dict[str, dict[str, mx.array]]:
    """Per module path, `{"lora_A", "lora_B"}` from an adapter folder or a weights file (PEFT's names)."""
    file = path
    if path.is_dir():
        file = path / WEIGHTS_FILE
        if not file.is_file() and (path / LEGACY_WEIGHTS_FILE).is_file():
            file = path / LEGACY_WEIGHTS_FILE
    if not file.is_file():
        raise XGLMError(f"{file} not found; an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        if file.suffix == ".bin":
            tensors = {k: v.load() for k, v in read_torch_bin(file).items()}
        else:
            tensors = mx.load(str(file))
    except XGLMError:  # a ValueError, but read_torch_bin's own, which already says what is wrong
        raise
    except (RuntimeError, ValueError, OSError) as e:
        raise XGLMError(f"{file} is not a readable adapter weights file ({e})") from None
    modules: dict[str, dict[str, mx.array]] = {}
    for name, value in tensors.items():
        match = _TENSOR.match(name)
        if match is None:
            raise XGLMError(f"{file}: tensor {name} is not a LoRA weight (lora_A / lora_B)")
        path_in_model = match["path"].removeprefix(PEFT_PREFIX)
        modules.setdefault(path_in_model, {})[match["part"]] = value
    for path_in_model, parts in modules.items():
        if len(parts) != 2:
            missing = "lora_B" if "lora_A" in parts else "lora_A"
            raise XGLMError(f"{file}: {path_in_model} has no {missing}.weight")
    if not modules:
        raise XGLMError(f"{file} holds no LoRA weights")
    return modules


def wrap_modules(model: nn.Module, paths: dict[str, tuple[int, float]], dropout: float = 0.0) -> None:
    """Replace the Linear layers at `paths` (module path -> (r, scaling)) with LoRALinear, in place."""
    modules = dict(model.named_modules())
    wrapped = []
    for path, (r, scaling) in paths.items():
        layer = modules.get(path)
        if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
            what = "does not exist" if layer is None else f"is a {type(layer).__name__}, not a Linear layer"
            raise XGLMError(f"adapter module {path} {what} in this XGLM model", param="adapter_path")
        wrapped.append((path, LoRALinear(layer, r, scaling, dropout)))
    model.update_modules(tree_unflatten(wrapped))
    model.train(model.training)  # new layers start in training mode; give them the model's


def apply_adapter(model: nn.Module, adapter_path: str | Path) -> LoraConfig:
    """Wrap the modules a PEFT LoRA adapter (folder or Hub repo id) names and load its weights.

    Every module named by the adapter's tensors gets a LoRALinear with peft's scaling. A module this
    model lacks, or a tensor whose shape does not fit it (an adapter for another model shape), is an
    XGLMError naming the tensor. Returns the adapter's config.
    """
    config, modules = read_adapter(adapter_path)
    load_adapter_weights(model, modules, str(adapter_path), config)
    return config


def load_adapter_weights(
    model: nn.Module, modules: dict, source: str, config: LoraConfig | None = None
) -> None:
    """Copy adapter arrays into the model's LoRALinear layers, checking shapes; with `config`, first
    wrap the modules they name, with that config's scaling."""
    wrap = config is not None
    check_weights(modules, source, config)
    if wrap:
        wrap_modules(model, {p: (parts["lora_A"].shape[0], 1.0) for p, parts in sorted(modules.items())})
    layers = {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}
    for path, parts in sorted(modules.items()):
        layer = layers.get(path)
        if layer is None:
            raise XGLMError(f"{source}: {path} carries an adapter, but that module is not adapted here")
        for part, value in sorted(parts.items()):
            expected = getattr(layer, part).shape
            if value.shape != expected:
                raise XGLMError(
                    f"{source}: tensor {PEFT_PREFIX}{path}.{part}.weight has shape {tuple(value.shape)}, "
                    f"this model needs {tuple(expected)}: the adapter was made for another model shape"
                )
            setattr(layer, part, value.astype(mx.float32))
        if wrap:
            layer.scaling = config.scaling(path, layer.r)
    mx.eval([getattr(layers[path], part) for path in modules for part in ("lora_A", "lora_B")])


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The model's LoRA arrays under PEFT's tensor names."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = module.lora_A
            out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = module.lora_B
    return out


def save_adapter(model: nn.Module, folder: str | Path, config: LoraConfig) -> Path:
    """Write the model's LoRA weights and `config` into `folder` in PEFT's format, each file atomically."""
    folder = Path(folder)
    weights = adapter_weights(model)
    mx.eval(list(weights.values()))
    text = json.dumps(config.to_peft(), indent=2, sort_keys=True) + "\n"
    with staged_file(folder / CONFIG_FILE, param="adapter_path") as work:
        work.write_text(text, encoding="utf-8")
    with staged_file(folder / WEIGHTS_FILE, param="adapter_path") as work:
        save_safetensors(work, weights, {"format": "pt"})
    return folder
