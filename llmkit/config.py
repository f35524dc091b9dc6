"""Recipes: dataclass configs loaded from YAML, overridden by flags and typed `--set key=value`.

    >>> from llmkit.config import load_recipe
    >>> cfg = load_recipe("recipes/smollm2-135m-shakespeare-lora.yaml", ["train.lr=1e-4", "train.max_steps=20"])
    >>> cfg.train.lr
    0.0001

Every key is `section.field` (or a top-level field such as `task`); an unknown key, or a value of the wrong
type, is a one-line `UsageError` that names the key and what it expects. `validate()` collects every problem
and names the flag to change, so a bad recipe is fixed in one go instead of one error per run.

Over 500 lines because every recipe key is a dataclass field with its docstring under it: this file is the
reference of every key `--set` and the recipes accept, and splitting it would scatter that reference.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.errors import UsageError

TASKS = ("causal-lm", "seq-cls")
METHODS = ("full", "lora", "qlora")
PRECISIONS = ("auto", "no", "bf16", "fp16")
SCHEDULERS = ("linear", "cosine", "constant")
REPORT_TO = ("none", "tensorboard", "mlflow", "wandb", "trackio")  # llmkit.training.trackers
DATA_FORMATS = ("auto", "text", "messages", "sharegpt", "prompt-completion", "preference")  # llmkit.data.formats.FORMATS
OBJECTIVES = ("sft", "dpo", "ipo", "simpo", "orpo", "grpo")
RL_LOSSES = ("grpo", "dr_grpo", "dapo")  # llmkit.training.grpo: how a batch's token losses are averaged
SCALE_REWARDS = ("group", "batch", "none")
ROLLOUT_BACKENDS = ("auto", "llama.cpp", "transformers")  # llmkit.inference.rollouts.ROLLOUT_BACKENDS
ZERO_SIGNAL = ("keep", "drop", "resample")
REFERENCE_FREE = ("simpo", "orpo")  # objectives that need no reference model
LR = 5e-5  # --lr's default
# --objective grpo with LoRA: a reward's gradient through a low-rank adapter barely moves the answers in 50 steps at
# 5e-5; 3e-4 took the sentiment recipe's flags from 0.34 to 0.8 exact-match in 50 steps (README, Learning from rewards)
GRPO_LORA_LR = 3e-4


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    """--model: bundled alias, model folder, .gguf file or Hub id (see `llmkit models`)."""
    allow_pickle: bool = False
    """--allow-pickle: load .bin/.pt weights (unpickling can run code; only for files you trust)."""
    trust_remote_code: bool = False
    """--trust-remote-code: run Python shipped with the model (auto_map)."""


@dataclass
class DataConfig:
    train: str = ""
    """--data: .txt / .csv / .tsv / .jsonl / .json / .parquet file, a folder of them, or a Hub dataset id[:split]."""
    eval: str | None = None
    """--eval-data: held-out data in the same format; without it, `eval_split` of the training rows are held out."""
    eval_split: float = 0.0
    """Fraction of training rows held out for eval when there is no --eval-data (0 = no eval)."""
    text_column: str = "text"
    """--text-column: the column holding the text (CSV/JSONL)."""
    text_pair_column: str | None = None
    """--text-pair-column: optional second text column for pair tasks (seq-cls)."""
    prompt_column: str | None = None
    """--prompt-column: causal-lm on CSV/JSONL prompt/response pairs: only the --text-column (response) tokens are
    learned, the prompt is context. Rows are not packed but cut to --block-size; a row whose response is cut off
    entirely is dropped and counted (it would teach nothing and make the loss NaN)."""
    label_column: str = "label"
    """--label-column: the label column (seq-cls); ints 0..N-1 or strings, mapped to ids."""
    max_length: int = 128
    """--max-length: seq-cls inputs are truncated to this many tokens."""
    block_size: int = 256
    """--block-size: causal-lm text is packed into blocks of this many tokens (chat: conversations are cut to it)."""
    format: str = "auto"
    """--format: auto (from the columns), text, messages (OpenAI), sharegpt, prompt-completion (chat data), preference
    (prompt/chosen/rejected pairs, for --objective dpo|ipo|simpo|orpo)."""
    chat_template: str | None = None
    """--chat-template: chatml or a Jinja file, for chat data; None = the model's own template (never guessed)."""
    train_on_prompt: bool = False
    """--train-on-prompt: chat data: learn every token, not only the assistant replies and their end-of-turn."""
    packing: bool = False
    """--packing: chat / prompt-response data: several conversations per --block-size row, kept apart by position ids
    (no attention across them, positions restart): less padding, same loss."""
    max_train_samples: int = 0
    """--max-train-samples: use only the first N training examples (text: N blocks; --packing: N packed rows), for a
    quick trial of a recipe; 0 = all (as HF's run_clm.py --max_train_samples)."""
    max_eval_samples: int = 0
    """--max-eval-samples: evaluate on only the first N held-out examples; 0 = all."""
    num_proc: int = 0
    """--num-proc: processes that tokenize the data; 0 = this machine's cores (the result is the same for any number)."""
    rebuild: bool = False
    """--rebuild-data: prepare the data again instead of using llmkit's prepared-data cache ($LLMKIT_CACHE/data)."""
    streaming: bool = False
    """--streaming: read, tokenize and pack the data while training, never all of it at once (data bigger than the
    disk or than is worth preparing); needs --max-steps. Checkpoints hold the stream's position, so --resume goes on
    from the next example."""
    shuffle_buffer: int = 1000
    """--streaming: examples held in the shuffle buffer (0 = the stream's own order); datasets' default size."""


@dataclass
class TrainConfig:
    epochs: float = 1.0
    """--epochs: passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = 0
    """--max-steps: optimizer steps to run; 0 = use epochs."""
    batch_size: int = 8
    """--batch-size: examples per device per micro-batch (global batch = batch_size x grad_accum x processes)."""
    grad_accum: int = 1
    """--grad-accum: micro-batches per optimizer step."""
    lr: float = 0.0
    """--lr: peak learning rate; 0 = the default, LR (5e-5), or GRPO_LORA_LR (3e-4) for --objective grpo with LoRA."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming the learning rate up from 0."""
    scheduler: str = "linear"
    """LR schedule after warmup: linear, cosine or constant."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 turns clipping off."""
    mixed_precision: str = "auto"
    """--mixed-precision: auto (bf16 autocast where it is faster: GPUs, Intel AMX CPUs; else fp32), no, bf16, fp16 (GPU)."""
    seed: int = 0
    """--seed: model init, dropout and data order."""
    group_by_length: bool = True
    """Batch examples of similar length together (seq-cls): far less padding, same randomness across batches."""
    eval_every: int = 0
    """--eval-every: evaluate every N optimizer steps; 0 = at the end of each epoch (or of the run)."""
    eval_batch_size: int = 0
    """Eval batch size; 0 = 2 x batch_size."""
    early_stopping: int = 0
    """Stop after this many evaluations without improvement of the eval metric; 0 = never."""
    save_every: int = 0
    """--save-every: write a resumable checkpoint every N optimizer steps; 0 = only at the end of each epoch."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (the best model is kept separately)."""
    max_bad_steps: int = 5
    """Stop (exit 4) after this many optimizer steps in a row whose loss or gradient is NaN/inf; each is skipped."""
    log_every: int = 10
    """Write a metrics.jsonl line every N optimizer steps."""
    threads: int = 0
    """--threads: CPU threads for torch; 0 = the physical cores of this process's share of the machine."""
    fsdp: bool = False
    """--fsdp: shard parameters, gradients and optimizer state across the processes (FSDP2, one unit per block)
    instead of copying the whole model to each; for models whose training state does not fit one device."""
    gradient_checkpointing: bool = False
    """--gradient-checkpointing: keep only each block's input and recompute the rest in backward: far less
    activation memory (long sequences, big batches) for about a third more compute."""
    chunked_loss: bool = True
    """Causal LMs: the LM head and cross-entropy a chunk of tokens at a time (llmkit/training/chunked_loss.py), never the
    tokens x vocabulary logits (1 GB at 4 x 256 tokens of a 262k vocabulary). Same loss and gradients."""
    compile: bool = False
    """--compile: torch.compile each transformer block (llmkit/training/speedups.py; on CPU inductor needs a C++ compiler). The
    first step pays the compile time (llmkit.json: llmkit.compile_seconds); later steps may run faster. Off by default:
    `benchmarks/levers.py` measures what it is worth on a machine. Not with --fsdp or --method qlora."""
    liger: str = "auto"
    """Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy in place of the chunked loss) for causal
    LMs on CUDA: auto (on where the device is CUDA and liger-kernel is installed: pip install 'llmkit[gpu]'; off with
    --compile, --fsdp, qlora), true (an error where it cannot run), false."""
    report_to: list[str] = field(default_factory=list)
    """--report-to: experiment trackers (tensorboard, mlflow, wandb, trackio; a list or comma-separated; none = only
    metrics.jsonl) that get the resolved recipe, every metrics.jsonl value at its step, the model card and loss.png;
    their logs go under OUT/tracking/ unless their own environment says otherwise (llmkit/training/trackers.py)."""


@dataclass
class LoraConfig:
    r: int = 8
    """--lora-r: adapter rank."""
    alpha: int = 16
    """--lora-alpha: scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """LoRA dropout on each adapted layer's input. 0 by default: peft then keeps no dropped-out copy of every
    adapted layer's input (SmolLM2 LoRA at 8 x 256: 4.95 vs 7.27 GB, 278 vs 196 tokens/s) and 30 steps on
    Shakespeare reach the same held-out perplexity (40.93 vs 40.97 at 0.05); unsloth and TRL default to 0 too."""
    target_modules: list[str] | None = None
    """--lora-targets: module names to adapt, or ["all-linear"]; None = all-linear for causal LMs, the attention
    projections for classifiers (query/value, q/k/v/o_proj, c_attn/c_proj)."""
    merge: bool = False
    """--merge: save a merged full model instead of the adapter (merged in full precision)."""
    fused: bool = True
    """Adapted linear layers add B(A(x)) x scaling to the base output in one addmm instead of peft's three
    elementwise steps (llmkit/models/lora.py fuse_lora): same values and gradients, fewer short-lived tensors.
    `--set lora.fused=false` uses peft's forward as is."""


@dataclass
class PreferenceConfig:
    beta: float | None = None
    """--beta: how far the policy may move from the reference (DPO/IPO), the reward scale (SimPO), the weight of the
    odds-ratio term (ORPO). None = each objective's usual value: 0.1 (DPO, IPO, ORPO; TRL's default), 2.0 (SimPO's paper)."""
    sft_weight: float = 0.0
    """--sft-weight: add this times the chosen responses' NLL (RPO): what keeps chosen rewards from falling with DPO."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin (TRL's simpo_gamma)."""
    disable_dropout: bool = True
    """Dropout off in the policy (every nn.Dropout at p=0): step 0 then has loss ln 2 and rewards 0, and the
    policy's log-probs are comparable with the reference's, which had no dropout (TRL does the same)."""
    cache_dir: str | None = None
    """Where reference log-probs are cached; None = $LLMKIT_CACHE/reference-logps."""


@dataclass
class RLConfig:
    """--objective grpo: learning from reward functions (llmkit/training/grpo.py)."""

    num_generations: int = 8
    """--num-generations: G completions sampled per prompt; advantages compare each with its group's mean."""
    max_new_tokens: int = 64
    """--max-new-tokens: longest completion; one cut there is scored as it is (its share is logged: clipped_ratio)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (log-probs are taken at the same temperature, as TRL does)."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts; 1 = the whole distribution (what the policy gradient assumes)."""
    beta: float = 0.0
    """Weight of the KL term to the reference (the LoRA adapter disabled); 0 = none and no reference pass (TRL's
    default since the Dr. GRPO / DAPO papers found it unneeded with verifiable rewards)."""
    epsilon: float = 0.2
    """PPO clip: the probability ratio to the rollouts' policy is clipped to [1 - eps, 1 + eps]."""
    loss: str = "dapo"
    """How token losses are averaged: grpo (per completion, then over completions: short answers weigh more),
    dr_grpo (sum / (completions x max_new_tokens): no length bias), dapo (over all tokens of the batch; TRL's default)."""
    scale_rewards: str = "group"
    """Advantages = (reward - group mean) / std: group (each group's std), batch (the batch's std), none (Dr. GRPO)."""
    steps_per_generation: int = 1
    """Optimizer steps on each batch of rollouts (their log-probs kept as the "old" policy, so the clip acts after the
    first); the prompt batches drawn in between are skipped. 1 = new rollouts every step."""
    zero_signal: str = "keep"
    """Groups whose rewards are all equal have zero advantage (no signal): keep (they still count in the token
    average, as TRL), drop (out of the average: the other groups' gradients are not diluted) or resample (DAPO's
    dynamic sampling: replaced by groups of other prompts, sampled for the same step, that do carry a signal; up to
    rl.resample_rounds more rollout calls, and those still without signal are dropped). Counted either way."""
    resample_rounds: int = 2
    """rl.zero_signal=resample: at most this many extra rollout calls per micro-batch, each for as many fresh prompts
    as groups are still without signal (each round costs up to a whole rollout call; 0 behaves as drop)."""
    rewards: list[str] = field(default_factory=list)
    """--reward: exact:COLUMN, contains:COLUMN, regex:PATTERN, json, json:schema.json, length:max=N, or
    path/to/file.py:function (TRL's signature: fn(prompts, completions, **columns) -> list[float | None])."""
    reward_weights: list[float] = field(default_factory=list)
    """--reward-weights: one weight per --reward (comma-separated); empty = all 1."""
    rollout_backend: str = "auto"
    """--rollout-backend: auto (llama.cpp on CPU for GGUF-convertible families, else transformers), llama.cpp, transformers."""
    log_rollouts_every: int = 10
    """Append the step's prompts, completions and rewards to OUT/rollouts.jsonl every N steps (0 = never)."""


@dataclass
class RunConfig:
    """The top-level keys every training command shares."""

    task: str = "causal-lm"
    """--task: causal-lm or seq-cls."""
    out: str = ""
    """--out: output folder (a normal Hugging Face model folder when done)."""
    overwrite: bool = False
    """--overwrite: replace an existing output folder."""
    resume: bool = False
    """--resume: continue from the newest complete checkpoint in --out."""
    quiet: bool = False
    """--quiet: no progress bar."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class FinetuneConfig(RunConfig):
    method: str = "full"
    """--method: full (every weight), lora (small adapters, base frozen) or qlora (lora on a 4-bit NF4 base)."""
    objective: str = "sft"
    """--objective: sft (next-token loss on the data) or a preference objective on prompt/chosen/rejected pairs:
    dpo, ipo (both against a reference: the starting model's log-probs, computed once and cached), simpo, orpo
    (no reference)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def validate(self) -> None:
        """Raise one UsageError listing every problem, each naming the flag (or key) to change."""
        problems: list[str] = []
        t, d, lo = self.train, self.data, self.lora
        if t.lr == 0:
            t.lr = GRPO_LORA_LR if self.objective == "grpo" and self.method != "full" else LR

        def need(ok: bool, msg: str) -> None:
            if not ok:
                problems.append(msg)

        need(self.task in TASKS, f"--task {self.task!r} is not one of {', '.join(TASKS)}")
        need(self.method in METHODS, f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        need(bool(self.model.name), "--model is required")
        problems.extend(run_problems(self.out, d, t))
        problems.extend(chat_problems(self.task, d))
        if self.method in ("lora", "qlora"):
            need(lo.r >= 1, f"--lora-r must be >= 1, got {lo.r}")
            need(lo.alpha > 0, f"--lora-alpha must be > 0, got {lo.alpha}")
            need(0 <= lo.dropout < 1, f"lora.dropout must be in [0, 1), got {lo.dropout}")
            need(lo.target_modules is None or len(lo.target_modules) > 0, "--lora-targets must name at least one module")
        else:
            need(not lo.merge, "--merge only applies to --method lora or qlora")
        need(self.method != "qlora" or self.task == "causal-lm", "--method qlora is for --task causal-lm; use --method lora for seq-cls")
        need(not d.streaming or self.task == "causal-lm", "--streaming is for --task causal-lm: classification needs one pass over "
             "all rows to know its labels; prepare the data instead (the cache is used without --streaming)")
        need(self.method != "qlora" or not t.fsdp, "--method qlora cannot be combined with --fsdp (4-bit weights do not shard); "
             "use --method lora with --fsdp, or qlora on one process per GPU")
        need(self.method != "qlora" or not t.compile, "--compile cannot be combined with --method qlora (bitsandbytes' 4-bit layers are "
             "not compiled); use --method lora, or qlora without --compile")
        need(self.method != "qlora" or str(t.liger).lower() != "true", "train.liger=true cannot be combined with --method qlora; use lora")
        problems.extend(preference_problems(self))
        problems.extend(rl_problems(self))
        if problems:
            raise UsageError("; ".join(problems))


LAYER_SELECTIONS = ("auto", "importance", "even")


@dataclass
class StudentConfig:
    layers: int | None = None
    """--student-layers: keep this many of the teacher's layers; None = half."""
    layer_selection: str = "auto"
    """--layer-selection: which layers to keep: importance (on a sample of the training data, drop the layer that
    changes the hidden states least (ShortGPT's block influence), re-measure the rest, repeat), even (evenly
    spaced, first and last kept: DistilBERT's choice) or auto: importance for causal LMs, even for classifiers,
    where importance dropped an encoder's first layer (students.resolve_selection); llmkit.json records the choice."""
    selection_samples: int = 32
    """Training examples the importance of each layer is measured on."""
    config: str | None = None
    """--student-config: a config.json or model folder for the student instead (same tokenizer as the teacher)."""


@dataclass
class KDConfig:
    temperature: float = 2.0
    """--temperature: softens both distributions; the KD term is scaled by T^2 so its gradients keep their size."""
    alpha: float = 0.5
    """--alpha: weight of the KD term; (1 - alpha) goes to the ordinary loss on the labels."""
    hidden_weight: float = 0.0
    """--hidden-weight: weight of a cosine loss between aligned student / teacher hidden states (0 = off)."""
    cache_top_k: int = 0
    """Cache the teacher's top-k logits per token on disk, once, and reuse them in later runs (0 = teacher runs live)."""
    cache_dir: str | None = None
    """Where cached teacher logits live; None = ~/.cache/llmkit/teacher-logits (or $LLMKIT_CACHE/teacher-logits)."""


@dataclass
class DistillConfig(RunConfig):
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: KDConfig = field(default_factory=KDConfig)

    def validate(self) -> None:
        """Raise one UsageError listing every problem, each naming the flag (or key) to change."""
        problems: list[str] = []
        s, k = self.student, self.distill
        if self.train.lr == 0:
            self.train.lr = LR

        def need(ok: bool, msg: str) -> None:
            if not ok:
                problems.append(msg)

        need(self.task in TASKS, f"--task {self.task!r} is not one of {', '.join(TASKS)}")
        need(bool(self.teacher.name), "--teacher is required")
        problems.extend(run_problems(self.out, self.data, self.train))
        problems.extend(chat_problems(self.task, self.data))
        need(not self.data.packing, "--packing is for finetune; distill runs the teacher on unpacked rows (set data.packing=false)")
        need(not self.data.streaming, "--streaming is for llmkit finetune; distill reads prepared data (llmkit prepare, or "
             "--max-train-samples for a part of it)")
        need(not self.train.fsdp, "--fsdp is for llmkit finetune: a student is small enough to train whole on each process "
             "(keep the teacher out of memory with distill.cache_top_k instead)")
        need(str(self.train.liger).lower() != "true", "train.liger=true is for llmkit finetune (distillation needs the student's logits)")
        need(s.layers is None or s.layers >= 1, f"--student-layers must be >= 1, got {s.layers}")
        need(s.layers is None or not s.config, "--student-layers and --student-config exclude each other; pass one")
        need(k.temperature > 0, f"--temperature must be > 0, got {k.temperature}")
        need(0 <= k.alpha <= 1, f"--alpha must be in [0, 1], got {k.alpha}")
        need(k.hidden_weight >= 0, f"--hidden-weight must be >= 0, got {k.hidden_weight}")
        need(k.cache_top_k >= 0, f"distill.cache_top_k must be >= 0, got {k.cache_top_k}")
        need(s.layer_selection in LAYER_SELECTIONS, f"--layer-selection {s.layer_selection!r} is not one of {', '.join(LAYER_SELECTIONS)}")
        need(s.selection_samples >= 1, f"student.selection_samples must be >= 1, got {s.selection_samples}")
        need(not (k.cache_top_k and k.hidden_weight), "--hidden-weight needs the live teacher's hidden states; set distill.cache_top_k=0")
        need(not (k.cache_top_k and k.alpha == 0), "distill.cache_top_k is pointless with --alpha 0 (no KD term); set it to 0")
        if problems:
            raise UsageError("; ".join(problems))


def rl_problems(cfg: FinetuneConfig) -> list[str]:
    """--objective grpo's checks; its flags without it."""
    r, d = cfg.rl, cfg.data
    if cfg.objective != "grpo":
        return ["--reward is for --objective grpo (learning from rewards); add --objective grpo"] if r.rewards else []
    problems = [f"{flag} is not for --objective grpo: {why}" for flag, on, why in (
        ("--task seq-cls", cfg.task != "causal-lm", "rewards train a causal LM (--task causal-lm)"),
        ("--packing", d.packing, "each prompt is sampled on its own"),
        ("--streaming", d.streaming, "prompts are prepared once; drop --streaming"),
        ("--train-on-prompt", d.train_on_prompt, "only the sampled completions are learned"),
        ("--fsdp", cfg.train.fsdp, "rollouts need the whole model on each process; use DDP (torchrun without --fsdp)"),
        (f"--format {d.format}", d.format != "auto", "the data is prompts (a 'prompt' column)")) if on]
    if not r.rewards:
        problems.append("--objective grpo needs at least one --reward (e.g. --reward exact:answer)")
    problems.extend(f"--reward {spec!r}: {why}" for spec in r.rewards if (why := reward_spec_problem(spec)))
    if r.reward_weights and len(r.reward_weights) != len(r.rewards):
        problems.append(f"--reward-weights has {len(r.reward_weights)} weights for {len(r.rewards)} --reward; give one per reward")
    if r.num_generations < 2:
        problems.append(f"--num-generations must be >= 2 (advantages compare completions of the same prompt), got {r.num_generations}")
    if r.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be >= 1, got {r.max_new_tokens}")
    for name, ok, want in (("temperature", r.temperature > 0, "> 0"), ("top_p", 0 < r.top_p <= 1, "in (0, 1]"),
                           ("beta", r.beta >= 0, ">= 0"), ("epsilon", r.epsilon > 0, "> 0"),
                           ("steps_per_generation", r.steps_per_generation >= 1, ">= 1"),
                           ("resample_rounds", r.resample_rounds >= 0, ">= 0"),
                           ("log_rollouts_every", r.log_rollouts_every >= 0, ">= 0")):
        if not ok:
            problems.append(f"rl.{name} must be {want}, got {getattr(r, name)}")
    for name, value, allowed in (("rl.loss", r.loss, RL_LOSSES), ("rl.scale_rewards", r.scale_rewards, SCALE_REWARDS),
                                 ("--rollout-backend", r.rollout_backend, ROLLOUT_BACKENDS), ("rl.zero_signal", r.zero_signal, ZERO_SIGNAL)):
        if value not in allowed:
            problems.append(f"{name} {value!r} is not one of {', '.join(allowed)}")
    if r.beta > 0 and cfg.method == "full":
        problems.append("rl.beta > 0 needs --method lora or qlora: the reference is the model with its adapter disabled (no second "
                        "model in memory); with --method full set rl.beta=0")
    return problems


REWARD_KINDS = ("exact", "contains", "regex", "json", "length")


def reward_spec_problem(spec: str) -> str | None:
    """What is wrong with a --reward spec's shape (llmkit/training/rewards.py loads it), or None."""
    kind, _, arg = spec.partition(":")
    if kind in ("exact", "contains") and not arg:
        return f"{kind}: needs a column, e.g. {kind}:answer"
    if kind == "regex":
        import re

        try:
            re.compile(arg)
        except re.error as e:
            return f"not a valid regular expression ({e})"
        return None if arg else "regex: needs a pattern, e.g. regex:^(yes|no)$"
    if kind == "length":
        n = arg.removeprefix("max=")
        return None if arg.startswith("max=") and n.isdigit() and int(n) > 0 else "length: needs max=N tokens, e.g. length:max=32"
    if kind in ("exact", "contains", "json"):
        return None
    path, _, fn = spec.rpartition(":")
    if not path.endswith(".py") or not fn.isidentifier():
        return f"not a reward: use one of {', '.join(REWARD_KINDS)} (exact:COLUMN, ...) or path/to/file.py:function"
    return None


def preference_problems(cfg: FinetuneConfig) -> list[str]:
    p, d, obj = cfg.preference, cfg.data, cfg.objective
    if obj not in OBJECTIVES:
        return [f"--objective {obj!r} is not one of {', '.join(OBJECTIVES)}"]
    if obj == "grpo":
        changed = [flag for flag, on in (("--beta", p.beta is not None), ("--sft-weight", p.sft_weight != 0)) if on]
        return [f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} for preference objectives; grpo's KL weight is "
                "rl.beta"] if changed else []
    if obj == "sft":
        changed = [flag for flag, on in (("--beta", p.beta is not None), ("--sft-weight", p.sft_weight != 0)) if on]
        return [f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} for preference objectives; add --objective dpo "
                "(or ipo, simpo, orpo)"] if changed else []
    problems = [f"{flag} is not for --objective {obj}: {why}" for flag, on, why in (
        ("--task seq-cls", cfg.task != "causal-lm", "preference tuning trains a causal LM (--task causal-lm)"),
        ("--packing", d.packing, "each pair is scored as one row"),
        ("--streaming", d.streaming, "the reference log-probs are computed once over the whole data; prepare it instead"),
        ("--train-on-prompt", d.train_on_prompt, "only the responses are compared"),
        (f"--format {d.format}", d.format not in ("auto", "preference"), "the data must be prompt/chosen/rejected pairs")) if on]
    if p.beta is not None and p.beta <= 0:
        problems.append(f"--beta must be > 0, got {p.beta}")
    if p.sft_weight < 0:
        problems.append(f"--sft-weight must be >= 0, got {p.sft_weight}")
    return problems


def run_problems(out: str, d: DataConfig, t: TrainConfig) -> list[str]:
    """The checks finetune and distill share: output folder, data and training settings."""
    problems: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    need(bool(d.train), "--data is required (a training file, folder or Hub dataset id)")
    need(bool(out), "--out is required (the output folder)")
    need(t.max_steps > 0 or t.epochs > 0, "--epochs or --max-steps must be > 0")
    need(t.max_steps >= 0, f"--max-steps must be >= 0, got {t.max_steps}")
    need(t.batch_size >= 1, f"--batch-size must be >= 1, got {t.batch_size}")
    need(t.grad_accum >= 1, f"--grad-accum must be >= 1, got {t.grad_accum}")
    need(t.lr > 0, f"--lr must be > 0, got {t.lr}")
    need(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    need(0 <= t.warmup_ratio < 1, f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    need(t.scheduler in SCHEDULERS, f"train.scheduler {t.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    need(t.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0, got {t.max_grad_norm}")
    need(t.mixed_precision in PRECISIONS, f"--mixed-precision {t.mixed_precision!r} is not one of {', '.join(PRECISIONS)}")
    need(not (t.fsdp and t.mixed_precision == "fp16"), "--fsdp with --mixed-precision fp16 is not supported (its loss scaler does "
         "not see sharded gradients); use --mixed-precision bf16 or no")
    need(not (t.compile and t.fsdp), "--compile cannot be combined with --fsdp (FSDP's per-block hooks are not compiled here); use one")
    liger = str(t.liger).lower()
    need(liger in ("auto", "true", "false"), f"train.liger {t.liger!r} is not one of auto, true, false")
    need(not (liger == "true" and t.compile), "train.liger=true cannot be combined with --compile (two ways to fuse the same work); use one")
    need(not (liger == "true" and t.fsdp), "train.liger=true cannot be combined with --fsdp (Liger's fused loss needs the whole LM head)")
    for name in ("eval_every", "eval_batch_size", "early_stopping", "save_every", "threads"):
        need(getattr(t, name) >= 0, f"train.{name} must be >= 0, got {getattr(t, name)}")
    need(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    need(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    for tracker in t.report_to:
        need(tracker in REPORT_TO, f"--report-to {tracker!r} is not one of {', '.join(REPORT_TO)}")
    need("none" not in t.report_to or set(t.report_to) == {"none"}, "--report-to none cannot be combined with a tracker")
    need(t.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {t.max_bad_steps}")
    problems.extend(data_problems(d))
    need(t.early_stopping == 0 or bool(d.eval) or d.eval_split > 0,
         "train.early_stopping needs eval data: pass --eval-data or set data.eval_split")
    need(not d.streaming or t.max_steps > 0, "--streaming needs --max-steps (a stream has no length to count epochs in)")
    return problems


def data_problems(d: DataConfig) -> list[str]:
    """The data settings' own checks (also what `llmkit prepare` validates)."""
    problems: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    need(0 <= d.eval_split < 1, f"data.eval_split must be in [0, 1), got {d.eval_split}")
    need(d.max_length >= 2, f"--max-length must be >= 2, got {d.max_length}")
    need(d.block_size >= 2, f"--block-size must be >= 2, got {d.block_size}")
    need(d.max_train_samples >= 0, f"--max-train-samples must be >= 0, got {d.max_train_samples}")
    need(d.max_eval_samples >= 0, f"--max-eval-samples must be >= 0, got {d.max_eval_samples}")
    need(d.num_proc >= 0, f"--num-proc must be >= 0, got {d.num_proc}")
    need(d.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {d.shuffle_buffer}")
    need(bool(d.text_column), "--text-column must not be empty")
    need(d.format in DATA_FORMATS, f"--format {d.format!r} is not one of {', '.join(DATA_FORMATS)}")
    need(not (d.streaming and d.eval_split > 0), "--streaming cannot hold out data.eval_split (the stream has no end to split); "
         "pass --eval-data")
    return problems


def chat_problems(task: str, d: DataConfig) -> list[str]:
    """Chat options only make sense for causal-LM training on conversations."""
    if task == "causal-lm":
        return []
    return [f"{flag} is for causal-lm chat data, not --task {task}" for flag, on in (
        ("--packing", d.packing), ("--chat-template", bool(d.chat_template)), ("--train-on-prompt", d.train_on_prompt),
        (f"--format {d.format}", d.format not in ("auto", "text"))) if on]


# ------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None,
                flags: dict[str, Any] | None = None, cls: type = FinetuneConfig) -> Any:
    """Defaults < recipe file < explicit flags (`{"train.lr": 1e-4}`) < `--set key=value` overrides."""
    cfg = cls()
    if path:
        problems = []  # every bad key of a recipe at once: fixing them one run at a time is a slow loop
        for key, value in _flatten(_read_yaml(Path(path))).items():
            try:
                set_key(cfg, key, value)
            except UsageError as e:
                problems.append(str(e))
        if problems:
            raise UsageError(f"{path}: " + "; ".join(problems))
    for key, value in (flags or {}).items():
        if value is not None:
            set_key(cfg, key, value)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r} must look like key=value, e.g. --set train.lr=1e-4")
        set_key(cfg, key.strip(), _parse_scalar(raw.strip()), source=f"--set {item}: ")
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise UsageError(f"recipe {path} does not exist; ready recipes are in recipes/")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:line {mark.line + 1}:column {mark.column + 1}" if mark else str(path)
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"recipe {where}: not valid YAML ({what})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"recipe {path} cannot be read: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"recipe {path} must be a mapping of keys (task:, model:, data:, train:, ...)")
    return data


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _parse_scalar(raw: str) -> Any:
    """YAML's reading of a command-line value (`1e-4` stays a string there; the field's type converts it)."""
    import yaml

    try:
        return yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        return raw


def keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every settable key of a config, e.g. ['task', ..., 'train.lr', ...]."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(keys(value, f"{prefix}{f.name}."))
        else:
            out.append(prefix + f.name)
    return out


# Names users bring from HF TrainingArguments / peft, mapped to ours for the "did you mean" hint.
_FAMILIAR = {"learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "per_device_train_batch_size": "batch_size",
             "gradient_accumulation_steps": "grad_accum", "warmup_steps": "warmup_ratio", "lora_alpha": "alpha", "lora_r": "r",
             "lora_dropout": "dropout", "target": "target_modules", "model_name_or_path": "name", "lr_scheduler_type": "scheduler"}


def set_key(cfg: Any, key: str, value: Any, source: str = "") -> None:
    """Set `section.field` to `value`, converted to the field's type; unknown keys and bad types fail here."""
    target, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(target)}
        if part not in names:
            known = keys(cfg)
            guess = ".".join([*parts[:-1], _FAMILIAR.get(parts[-1], parts[-1])])
            close = [guess] if guess in known else difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; known keys: {', '.join(known)}"
            raise UsageError(f"{source}unknown recipe key '{key}'{hint}")
        if i < len(parts) - 1:
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                raise UsageError(f"{source}unknown recipe key '{key}' ({'.'.join(parts[:i + 1])} is not a section)")
            continue
        if dataclasses.is_dataclass(getattr(target, part)):
            raise UsageError(f"{source}'{key}' is a section; set its keys, e.g. {key}.{dataclasses.fields(getattr(target, part))[0].name}=...")
        hints = typing.get_type_hints(type(target))
        setattr(target, part, coerce(value, hints[part], key, source))


def coerce(value: Any, tp: Any, key: str, source: str = "") -> Any:
    """Convert a YAML / command-line value to a field type, or explain what was expected."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        tp = next(a for a in args if a is not type(None))
        args = typing.get_args(tp)

    def bad(what: str) -> UsageError:
        return UsageError(f"{source}'{key}' expects {what}, got {value!r}")

    if typing.get_origin(tp) is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise bad("a list (YAML list or comma-separated)")
        return [coerce(v.strip() if isinstance(v, str) else v, args[0], key, source) for v in items]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise bad("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise bad("an integer") from None
    if tp is float:
        if isinstance(value, bool):
            raise bad("a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise bad("a string")
        return str(value)
    raise bad(str(tp))
