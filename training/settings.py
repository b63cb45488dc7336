"""One settings object for a training run: the method, its options and the training loop's options.

Every field maps to one CLI flag (`--field-name`, see training/cli.py). Fields left at None take a
per-method default (see `resolved_*` helpers), chosen so that the embedded default model
(SmolLM2-135M-Instruct) trains on a CPU in minutes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapterserve.training.method_table import METHODS, TRAINING_METHODS

Stage = Literal["pt", "sft", "dpo", "grpo"]
STAGES: tuple[Stage, ...] = ("pt", "sft", "dpo", "grpo")
# What --stage grpo can push into a served adapter in place after every step (linear kinds).
GRPO_METHODS: tuple[str, ...] = ("lora", "ia3")

# TRL's vllm_importance_sampling_mode values (docs/training.md, GRPO).
ImportanceSamplingMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]

Method = str  # a name in training/method_table.py's TRAINING_METHODS (checked by TrainSettings)
PROMPT_LEARNING_METHODS: frozenset[str] = frozenset(
    m.name for m in TRAINING_METHODS.values() if m.prompt_learning
)
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")


class TrainSettings(BaseModel):
    """Everything `adapterserve train` needs besides the file paths."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- what to train -------------------------------------------------------------------------
    stage: Stage = Field(
        "sft",
        description="pt: raw text, loss on every token; sft: prompt/completion or chat; "
        "dpo: preference pairs (prompt, chosen, rejected); grpo: prompts and a reward (online RL, rollouts "
        "sampled by a server)",
    )
    method: Method = Field(
        "lora", description="training method", json_schema_extra={"choices": list(METHODS)}
    )
    base_model: str | None = Field(None, description="base model path or name; None = embedded SmolLM2")
    device: str | None = Field(None, description="None = cuda if available else cpu")

    # --- method options ------------------------------------------------------------------------
    rank: int = Field(8, ge=1, description="LoRA/QLoRA rank; AdaLoRA target (average) rank")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / rank)")
    use_dora: bool = Field(False, description="LoRA/QLoRA: weight-decomposed LoRA (PEFT's use_dora)")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA/AdaLoRA dropout")
    target_modules: tuple[str, ...] | None = Field(
        None,
        description="linear layers to adapt; None = q_proj,v_proj for LoRA kinds, PEFT's default for IA3",
    )
    feedforward_modules: tuple[str, ...] | None = Field(
        None, description="IA3: which target modules scale their input (feed-forward); None = PEFT default"
    )
    num_virtual_tokens: int = Field(16, ge=1, description="prompt/p-tuning/prefix virtual tokens")
    init_text: str | None = Field(
        None, description="prompt tuning: initialise the soft prompt from this text"
    )
    encoder_type: Literal["mlp", "lstm"] = Field("mlp", description="p-tuning prompt encoder")
    encoder_hidden_size: int | None = Field(
        None, ge=1, description="p-tuning encoder width; None = hidden size"
    )
    prefix_projection: bool = Field(
        False, description="prefix tuning: train through an MLP reparameterisation (dropped when saved)"
    )
    reduction_factor: int = Field(16, ge=1, description="bottleneck: hidden size / adapter size")
    bottleneck_placement: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="bottleneck: after attention and feed-forward (houlsby) or feed-forward only"
    )
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field(
        "relu", description="bottleneck: the adapter's nonlinearity"
    )
    adalora_init_r: int = Field(12, ge=1, description="AdaLoRA: rank every module starts with")
    adalora_tinit: int | None = Field(
        None, ge=0, description="AdaLoRA: warm-up steps; None = a tenth of the steps"
    )
    adalora_tfinal: int | None = Field(
        None, ge=0, description="AdaLoRA: final fixed-rank steps; None = a fifth of the steps"
    )
    adalora_delta_t: int = Field(1, ge=1, description="AdaLoRA: steps between two rank reallocations")
    adalora_beta1: float = Field(0.85, gt=0, lt=1, description="AdaLoRA: sensitivity smoothing")
    adalora_beta2: float = Field(0.85, gt=0, lt=1, description="AdaLoRA: uncertainty smoothing")
    adalora_orth_reg_weight: float = Field(0.5, ge=0, description="AdaLoRA: orthogonality regulariser")

    # --- training loop -------------------------------------------------------------------------
    epochs: float = Field(1.0, gt=0, description="passes over the training data (ignored with max_steps)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(8, ge=1, description="examples per forward pass")
    grad_accum: int = Field(1, ge=1, description="forward passes per optimizer step")
    learning_rate: float | None = Field(None, gt=0, description="None = a per-method default")
    lr_schedule: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="learning-rate schedule"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_length: int = Field(256, ge=8, description="tokens per example at most (prompt is cut from the left)")
    seed: int = Field(0, description="seed for initialisation and data order")
    bf16: bool | None = Field(None, description="bf16 autocast; None = on where the device supports it")
    logging_steps: int = Field(10, ge=1, description="log the loss every this many steps")

    dpo_beta: float = Field(0.1, gt=0, description="DPO: strength of the pull towards the reference model")

    # --- grpo (online RL against a server) ------------------------------------------------------
    rollout_server: str | None = Field(
        None,
        description="grpo: host:port of the adapterserve server that samples the rollouts and takes the "
        "weights after every step; None = a server started inside this process",
    )
    adapter_name: str | None = Field(
        None, description="grpo: the adapter's name on the rollout server; None = the --out folder's name"
    )
    reward: tuple[str, ...] = Field(
        ("exact",),
        description="grpo: rewards, summed: exact, contains, regex, json-schema (they read the prompt "
        "records' answer / pattern / schema field) or module:function",
    )
    num_generations: int = Field(4, ge=2, description="grpo: completions sampled per prompt (one group)")
    max_new_tokens: int = Field(32, ge=1, description="grpo: tokens per completion at most")
    temperature: float = Field(1.0, gt=0, description="grpo: sampling temperature of the rollouts")
    grpo_beta: float = Field(0.0, ge=0, description="grpo: KL penalty towards the base (0 = none)")
    importance_sampling_correction: bool = Field(
        True,
        description="grpo: weight the loss by the ratio of the trainer's to the server's probability of "
        "each sampled token (TRL's vllm_importance_sampling_correction)",
    )
    importance_sampling_mode: ImportanceSamplingMode = Field(
        "sequence_mask",
        description="grpo: token_* one ratio per token, sequence_* one per completion; *_truncate clips "
        "it to [clip-min, clip-max], *_mask zeroes it outside",
    )
    importance_sampling_clip_min: float | None = Field(
        None, ge=0, description="grpo: the ratio's lower bound (None = no lower bound)"
    )
    importance_sampling_clip_max: float = Field(3.0, gt=0, description="grpo: the ratio's upper bound")

    # --- convergence (early stopping on a validation loss) ---------------------------------------
    val_size: int = Field(
        0, ge=0, description="records held out of --data (seeded draw) for a validation loss; 0 = none"
    )
    early_stop_patience: int | None = Field(
        None,
        ge=1,
        description="stop once the validation loss has not improved for this many checks in a row "
        "(needs --val-size and --max-steps as the cap); None = train the planned steps",
    )
    early_stop_every: int = Field(10, ge=1, description="steps between two validation-loss checks")
    early_stop_min_delta: float = Field(
        0.02, ge=0, lt=1, description="an improvement is a drop of more than this fraction of the best loss"
    )
    early_stop_min_abs_delta: float = Field(
        0.001,
        ge=0,
        description="... and by more than this much (a loss nearing 0 keeps falling by a fraction forever)",
    )

    # --- evaluation ----------------------------------------------------------------------------
    eval_max_new_tokens: int = Field(48, ge=1, description="greedy tokens generated per eval example at most")
    eval_limit: int | None = Field(None, ge=1, description="evaluate on the first N eval records only")
    eval_backend: Literal["auto", "engine", "peft"] = Field(
        "auto",
        description="generation for eval: the server's engine (auto: when installed) or PEFT full-forward greedy",
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in TRAINING_METHODS:
            raise ValueError(f"unknown method {value!r}; choose from {', '.join(METHODS)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainSettings:
        if self.method == "adalora" and self.adalora_init_r < self.rank:
            raise ValueError(f"adalora_init_r ({self.adalora_init_r}) must be >= rank ({self.rank})")
        if self.init_text is not None and self.method != "prompt-tuning":
            raise ValueError("init_text applies to --method prompt-tuning only")
        if self.stage == "dpo" and self.method == "sft":
            raise ValueError(
                "--stage dpo needs a PEFT method: its reference model is the base with the adapter "
                "disabled; full fine-tuning (--method sft) would need a second copy of the model"
            )
        if self.stage == "dpo" and self.method != "sft" and TRAINING_METHODS[self.method].peft_config is None:
            raise ValueError(
                f"--stage dpo --method {self.method}: DPO runs through TRL with a PEFT adapter (its reference "
                f"is the base with that adapter disabled); {self.method} is not a PEFT method"
            )
        if self.stage == "dpo" and self.method in PROMPT_LEARNING_METHODS:
            raise ValueError(
                f"--stage dpo --method {self.method}: this module runs DPO with adapters that wrap linear "
                "layers only (lora, qlora, dora, adalora, ia3), not prompt-learning methods"
            )
        if self.stage == "dpo" and (self.val_size or self.early_stop_patience):
            raise ValueError("--stage dpo trains the planned steps (no --val-size / --early-stop-patience)")
        if self.stage == "grpo" and self.method not in GRPO_METHODS:
            raise ValueError(
                f"--stage grpo --method {self.method}: the adapter is pushed into the server in place after "
                f"every step; choose one of {', '.join(GRPO_METHODS)} (lora with --use-dora for DoRA)"
            )
        if self.stage == "grpo" and (self.batch_size * self.grad_accum) % self.num_generations:
            raise ValueError(
                f"--stage grpo: --batch-size x --grad-accum ({self.batch_size * self.grad_accum}) must be a "
                f"multiple of --num-generations ({self.num_generations}): each step takes whole groups"
            )
        clip_min = self.importance_sampling_clip_min
        if clip_min is not None and clip_min >= self.importance_sampling_clip_max:
            raise ValueError(
                f"--importance-sampling-clip-min ({clip_min}) must be below --importance-sampling-clip-max "
                f"({self.importance_sampling_clip_max})"
            )
        if self.stage == "grpo" and (self.val_size or self.early_stop_patience):
            raise ValueError("--stage grpo trains the planned steps (no --val-size / --early-stop-patience)")
        if self.use_dora and self.method not in ("lora", "qlora"):
            raise ValueError("use_dora applies to --method lora and qlora only")
        if self.early_stop_patience is not None and (self.val_size == 0 or self.max_steps is None):
            raise ValueError("early stopping needs --val-size > 0 and --max-steps (the cap)")
        return self

    def resolved_learning_rate(self) -> float:
        return (
            self.learning_rate
            if self.learning_rate is not None
            else TRAINING_METHODS[self.method].learning_rate
        )

    def resolved_lora_targets(self) -> list[str]:
        return list(self.target_modules or DEFAULT_LORA_TARGETS)

    def resolved_adalora_schedule(self, total_steps: int) -> tuple[int, int]:
        """(tinit, tfinal) for a run of `total_steps` optimizer steps, leaving a budgeting phase."""
        tinit = self.adalora_tinit if self.adalora_tinit is not None else max(0, total_steps // 10)
        tfinal = self.adalora_tfinal if self.adalora_tfinal is not None else max(0, total_steps // 5)
        return tinit, tfinal
