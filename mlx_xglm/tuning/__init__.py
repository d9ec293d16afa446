"""Fine-tuning: LoRA and QLoRA adapters in PEFT's format, JSONL data, the training loop, and fuse."""

from ..checkpoints.adapters import LoraConfig, apply_adapter, save_adapter
from ..model.lora import LoRALinear
from .data import Example, iterate_batches, load_dataset
from .fuse import fuse, fuse_adapters
from .lora import apply_lora, lora_config, trainable_parameters
from .trainer import TrainingArgs, TrainingUpdate, evaluate, train

__all__ = [
    "Example",
    "LoRALinear",
    "LoraConfig",
    "TrainingArgs",
    "TrainingUpdate",
    "apply_adapter",
    "apply_lora",
    "evaluate",
    "fuse",
    "fuse_adapters",
    "iterate_batches",
    "load_dataset",
    "lora_config",
    "save_adapter",
    "train",
    "trainable_parameters",
]
