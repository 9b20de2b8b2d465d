"""affinage's LoRA: loralib's API plus injection into transformers models and PEFT's format."""

from affinage.lora.embedding import LoRAEmbedding
from affinage.lora.inject import find_targets, fuse_lora, inject_lora, lora_modules
from affinage.lora.layers import LoRALinear, lora_state_dict, mark_only_lora_as_trainable
from affinage.lora.loralib_layers import Conv1d, Conv2d, Conv3d, ConvLoRA, Embedding, Linear, LoRALayer, MergedLinear
from affinage.lora.peft_format import load_adapter, save_adapter

__all__ = [
    "Linear",
    "Embedding",
    "MergedLinear",
    "ConvLoRA",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "LoRALayer",
    "LoRALinear",
    "LoRAEmbedding",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "inject_lora",
    "find_targets",
    "lora_modules",
    "fuse_lora",
    "save_adapter",
    "load_adapter",
]
