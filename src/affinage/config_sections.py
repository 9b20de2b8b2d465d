"""The config's sections (adapter, prompt, data, trainer, eval, generation): each field's default and meaning.

Every default of the project lives here or in :mod:`affinage.config` (the top level); each field's
description doubles as documentation (``affinage config`` prints them).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from affinage.constraint_config import ConstraintConfig


class _Section(BaseModel):
    # Unknown keys are errors: a typo such as `learnig_rate` must not be silently ignored.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())


class QuantizationConfig(_Section):
    bits: Literal[4, 8] = Field(4, description="Load the frozen base model in 4-bit (NF4) or 8-bit.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (bitsandbytes).")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (QLoRA).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype the dequantized weights are multiplied in (auto: trainer.precision's choice)."
    )


class AdapterConfig(_Section):
    type: Literal["lora"] = Field("lora", description="Adapter kind. Only LoRA for now.")
    r: int = Field(16, ge=1, description="LoRA rank: size of the low-rank update.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input during training.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names (suffixes) to adapt, e.g. [q_proj, v_proj], or 'all-linear' for every "
        "linear layer except the output head. embed_tokens (the input table) and lm_head (the output head) are adapted "
        "only when named; with tied embeddings the other side stays unchanged.",
    )

    shared_dropout_mask: bool = Field(
        True,
        description="Layers reading the same input (q/k/v, gate/up) share one LoRA dropout mask: 4 dropout passes "
        "per block instead of 7 (faster, less memory); false: an independent mask per layer, as PEFT.",
    )
    layers_to_transform: int | list[int] | None = Field(
        None,
        description="Blocks to adapt: None for all, N for the last N blocks (backward stops below them: faster), or a "
        "list of indices.",
    )
    use_rslora: bool = Field(
        False, description="rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r (PEFT's use_rslora)."
    )
    use_dora: bool = Field(
        False,
        description="DoRA: a trainable magnitude per output feature times the direction of W + scaling*B*A "
        "(PEFT's use_dora). Needs a full-precision base (no quantization).",
    )
    init: Literal["default", "gaussian", "pissa"] = Field(
        "default",
        description="Initial A and B (B = 0 except pissa): default (A Kaiming-uniform), gaussian (A ~ N(0, std 1/r)), "
        "or pissa (A, B from the top-r singular vectors of W, the base keeps the residual; saved as a rank-2r LoRA on "
        "the original base). Embeddings always start with A = 0, B ~ N(0, 1), as in PEFT.",
    )
    rank_pattern: dict[str, int] = Field(
        default_factory=dict,
        description="Per-module ranks overriding r, PEFT's rank_pattern: a key matches a module whose name ends "
        "with it (regex (.*\\.)?key$), e.g. {down_proj: 32, layers.0.self_attn.q_proj: 4}.",
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict,
        description="Per-module alphas overriding alpha, matched like rank_pattern (PEFT's alpha_pattern).",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_string(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "all-linear":
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("rank_pattern")
    @classmethod
    def _positive_ranks(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {key: rank for key, rank in value.items() if rank < 1}
        if bad:
            raise ValueError(f"ranks must be at least 1, got {bad}")
        return value

    @field_validator("alpha_pattern")
    @classmethod
    def _positive_alphas(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {key: alpha for key, alpha in value.items() if alpha <= 0}
        if bad:
            raise ValueError(f"alphas must be positive, got {bad}")
        return value


class PromptConfig(_Section):
    template: str | None = Field(
        None,
        description="A named template (alpaca, chatml, llama2, llama3, mistral, phi3), or a literal prompt with "
        "{field} placeholders filled from each data row. Empty: the model's own chat template wraps the input "
        "feature as the user message.",
    )
    system: str | None = Field(
        None, description="System message for chat templates (None: the template's own default)."
    )

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from affinage.data.template import NAMED_TEMPLATES  # lazy: affinage.data imports this module

        name = value.strip().lower()
        if name in NAMED_TEMPLATES:
            return name
        if "{" not in value:
            raise ValueError(
                f"unknown template name; named templates: {', '.join(sorted(NAMED_TEMPLATES))} "
                "(a literal template needs {field} placeholders)"
            )
        return value

    @model_validator(mode="after")
    def _system_needs_a_chat_template(self) -> PromptConfig:
        if self.template == "alpaca" and self.system is not None:
            raise ValueError(
                "prompt.system has no place in the alpaca template (its preamble is fixed); remove it or use a chat "
                "template"
            )
        return self


class FeatureConfig(_Section):
    name: str = Field(description="Column of the data row (input: the prompt; output: the completion).")
    type: Literal["text", "category"] = Field("text", description="'category' marks a label task (classification).")
    preprocessing: dict[str, Any] = Field(default_factory=dict, description="Ludwig compatibility; unused.")


class SplitConfig(_Section):
    ratios: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train/valid/test fractions.")
    seed: int = Field(42, description="Shuffling seed of the split.")
    near_duplicate_threshold: float | None = Field(
        0.8,
        ge=0.5,
        le=1,
        description="Rows at least this similar form one group: `data split` keeps a group in one split, "
        "`data check` reports a group spanning train and valid/test as leakage. Similarity: the Jaccard share of "
        "character 5-grams or of distinct words, once case, accents, symbols and spacing are folded. 1 or null: "
        "exact duplicates only (equal once folded).",
    )


class TransformConfig(_Section):
    name: str = Field(
        description="'strip_accents', 'normalize_unicode', 'hearts' (seed 002: one heart from its list between "
        "every word of the answer) or a user function 'module.function' taking (text) or (text, rng) and returning "
        "text."
    )
    side: Literal["prompt", "completion", "both"] | None = Field(
        None,
        description="Which text it rewrites (None: the transform's default; hearts -> completion). Prompt-side "
        "transforms are applied again at inference.",
    )


class DataConfig(_Section):
    dataset: str | None = Field(None, description="One file to split into train/valid/test (stratified by label).")
    train: str | None = Field(None, description="Training file (JSONL), or a directory with train/valid/test.jsonl.")
    valid: str | None = Field(None, description="Validation file.")
    test: str | None = Field(None, description="Test file, never trained on.")
    split: SplitConfig = Field(default_factory=SplitConfig)
    transforms: list[TransformConfig] = Field(
        default_factory=list,
        description="Text transforms applied in order to every split, e.g. [strip_accents, hearts].",
    )

    @field_validator("transforms", mode="before")
    @classmethod
    def _names_as_objects(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value


class SchedulerConfig(_Section):
    """Ludwig's `learning_rate_scheduler` block."""

    warmup_fraction: float | None = Field(None, ge=0, lt=1, description="Share of steps spent warming up.")
    decay: Literal["cosine", "linear", "constant", None] = Field(None, description="Decay after warm-up.")


class TrainerConfig(_Section):
    type: Literal["finetune", "none"] = Field(
        "finetune",
        description="finetune: train the adapter; none (Ludwig's): no training, the base model is evaluated on the "
        "test split and written as a run (its adapter changes nothing) that eval, predict and export take.",
    )
    epochs: float = Field(3, gt=0, description="Passes over the training split (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the adapter weights.")
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch.")
    gradient_accumulation: int = Field(
        1, ge=1, alias="gradient_accumulation_steps", description="Micro-batches per optimizer step."
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of the steps spent in linear warm-up.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    learning_rate_scheduler: SchedulerConfig | None = Field(None, description="Ludwig form of warmup/decay.")
    max_grad_norm: float | None = Field(1.0, description="Clip the gradient norm (None: no clipping).")
    max_seq_len: int = Field(512, ge=8, description="Longer examples are truncated (and counted).")
    eval_every: int | None = Field(None, ge=1, description="Validate every N steps (None: once per epoch).")
    seed: int = Field(42, description="Seed for shuffling, dropout and initialisation.")
    precision: Literal["auto", "bf16", "fp32", "fp16"] = Field(
        "auto", description="auto: bf16 where the hardware runs it fast, else fp32."
    )
    packing: bool | Literal["auto"] = Field(
        "auto",
        description="Pack several examples per row (no attention across them, same loss). auto: when "
        "length-bucketed batches would still be >15% padding and the frozen-prefix cache is not in use.",
    )
    pad_to_multiple_of: int = Field(
        8,
        ge=1,
        description="Pad each batch's width up to a multiple of this (padding carries no loss and no attention). "
        "Fewer distinct shapes: on CPU, oneDNN compiles a bf16 kernel for each new one; on GPU, tensor cores "
        "prefer multiples of 8. 1: pad to the longest example only.",
    )
    max_tokens_per_forward: int | Literal["auto"] | None = Field(
        "auto",
        description="Run a micro-batch with more padded tokens than this as several forward passes (same gradient, "
        "lower peak memory). auto: 512 on CPU, no limit on GPU. None: no limit. On some CPUs larger is faster "
        "for more memory (2048 on a 2-vCPU Xeon: 0.74x the bf16 step time, +26% peak; docs/performance.md).",
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Keep only each block's input for backward and recompute the block: far less activation "
        "memory for about one more forward pass of compute (~1.5x a LoRA step's time). auto: only for a forward pass "
        "the token budget could not split (one row longer than max_tokens_per_forward) whose activations, measured "
        "on the model, would take more than a quarter of the machine's memory.",
    )
    logits_only_on_labels: bool = Field(True, description="Apply the vocabulary head only where a label exists.")
    best_metric: Literal["valid_loss", "task"] = Field(
        "valid_loss",
        description="What picks the best checkpoint and drives early stopping: the validation loss or the "
        "eval task's metric on the validation split (accuracy, chrF or pattern score).",
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many validations without improvement (None: never stop early)."
    )
    cache_frozen_blocks: bool = Field(
        True,
        description="With adapter.layers_to_transform, run the frozen lower blocks once per example, not once per "
        "epoch.",
    )
    save_every: int | None = Field(
        50,
        ge=1,
        description="Write a resume checkpoint every N optimizer steps, besides the one after each validation "
        "(None: only after validations). A killed run restarted with the same command continues from the newest.",
    )
    keep_checkpoints: int = Field(
        2, ge=1, description="Resume checkpoints kept in the run's checkpoint/ directory (the newest ones)."
    )
    max_nonfinite_steps: int | None = Field(
        10,
        ge=1,
        description="A step whose loss or gradient is NaN or infinite is skipped (no update) and counted; stop the "
        "run after this many in a row (None: never stop).",
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun: ddp keeps a whole model in every process and sums the LoRA gradients; fsdp "
        "shards the model's weights across the processes (FSDP2), for a model too big for one device, at the cost "
        "of gathering the frozen weights in every forward. One process: ignored.",
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="Experiment trackers that also get the training curves: tensorboard (event files in the run's "
        "tensorboard/ directory), wandb, mlflow (each needs its package installed).",
    )

    @field_validator("max_tokens_per_forward")
    @classmethod
    def _positive_budget(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be a positive number of tokens, 'auto' or null")
        return value

    @model_validator(mode="after")
    def _apply_ludwig_scheduler(self) -> TrainerConfig:
        if self.learning_rate_scheduler is not None:
            if self.learning_rate_scheduler.warmup_fraction is not None:
                self.warmup_ratio = self.learning_rate_scheduler.warmup_fraction
            if self.learning_rate_scheduler.decay is not None:
                self.lr_scheduler = self.learning_rate_scheduler.decay
        return self


class EvalConfig(_Section):
    task: Literal["auto", "classification", "generation", "pattern"] = Field(
        "auto",
        description="auto: pattern when eval.pattern is set, classification when the output feature is a category or "
        "has "
        "few distinct values, else generation.",
    )
    method: Literal["score", "generate"] = Field(
        "score", description="classification: score every label (restricted to the label set) or generate freely."
    )
    labels: list[str] | None = Field(None, description="Label set (None: the distinct completions of the train split).")
    abstain_threshold: float | None = Field(
        None, gt=0, lt=1, description="classification: answer 'unsure' when the top label's probability is below this."
    )
    pattern: str | None = Field(
        None, description="pattern task: a named checker ('hearts') or 'module.function' scoring one output in [0, 1]."
    )
    max_new_tokens: int = Field(64, ge=1, description="Generation length for generation and pattern tasks.")
    max_examples: int | None = Field(None, ge=1, description="Evaluate on at most this many test rows.")
    sets: dict[str, str] = Field(
        default_factory=dict,
        description="Extra evaluation files by name, never trained on (e.g. {heldout: heldout.jsonl, short: "
        "short.jsonl}): `affinage compare` reports each, base vs fine-tuned.",
    )


class GenerationConfig(_Section):
    """Ludwig's `generation` block: defaults for predict."""

    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0, description="0: greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1)
    constraint: ConstraintConfig | None = Field(
        None, description="Constrained decoding for predict and generation evaluation (see docs/evaluation.md)."
    )
