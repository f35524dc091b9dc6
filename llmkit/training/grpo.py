"""Learning from rewards on the one loop: GRPO and its Dr. GRPO / DAPO variants as a `TrainJob.loss_fn`.

    >>> loss = GRPOLoss(prompts, rollouts, rewards, weights, cfg.rl, pad_id=..., seed=0, grad_accum=1, out=out)
    >>> TrainJob(model, prompts, None, PromptCollator(G), "grpo", cfg.train, out, loss_fn=loss, log_extra=loss.log_extra)

Each micro-batch the loop draws is a batch of B prompt rows. For it the loss samples G completions per prompt from
the current policy (the rollouts backend, injected by llmkit/finetune.py: transformers or llama.cpp), scores them with
the reward functions (llmkit/training/rewards.py), and turns the rewards into group-relative advantages:

    A_i = (r_i - mean(r_group)) / (std + 1e-4)     std: of the group (scale_rewards=group), the batch (batch), or 1 (none)

The policy loss per completion token t is PPO's clipped surrogate plus, with beta > 0, the k3 estimate of the KL to the
reference (the LoRA adapter disabled: no second model in memory):

    ratio = exp(logp - logp_old)     l_t = -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) + beta (exp(ref - logp) - (ref - logp) - 1)

and the three aggregations differ only in how tokens are averaged (`rl.loss`):

    grpo      mean over each completion's tokens, then over completions       (short completions weigh more)
    dr_grpo   sum over all tokens / (completions x max_new_tokens)             (Dr. GRPO: no length bias)
    dapo      sum over all tokens / all tokens in the batch                    (DAPO; TRL's default)

With `steps_per_generation` k > 1 the same rollouts serve k optimizer steps; their log-probs at sampling time are
kept as logp_old, so the clip bounds how far those steps move (with k = 1, logp_old = logp.detach(): ratio 1).

Groups whose rewards are all equal have zero advantage: counted every step (zero_signal_groups), and by
`rl.zero_signal` kept in the token average (TRL), dropped from it, or resampled (DAPO's dynamic sampling: replaced by
the groups of fresh prompts, sampled for the same step, that do carry a signal).

Exact resume: step s's rollouts are sampled under a seed made from the run's seed, s, the micro-batch and the process,
so a resumed run samples the same completions; rollouts that serve several steps are kept on disk until used.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.atomic import atomic_path
from llmkit.config import RLConfig
from llmkit.training.losses import LoggedParts, keeps_logits
from llmkit.training.rewards import Reward, score

ROLLOUTS_LOG = "rollouts.jsonl"
BUFFERS = ".grpo-rollouts"  # rollouts waiting for their later steps (steps_per_generation > 1), per cycle and process


def rollout_seed(run_seed: int, step: int, micro: int, process: int) -> int:
    """The seed of one micro-batch's rollouts: fixed by where it is in the run, not by how the run got there."""
    return (run_seed * 1_000_003 + step * 7_919 + micro * 101 + process) % (2**31 - 1)


def group_advantages(rewards: Any, group: int, scale: str = "group") -> tuple[Any, Any]:
    """(advantages, per-group std) of rewards [N] laid out prompt-major in groups of `group` (N = prompts x group)."""
    import torch

    r = rewards.float().view(-1, group)
    std = r.std(dim=1)  # unbiased, as TRL
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (std.unsqueeze(1) + 1e-4)
    elif scale == "batch":
        centred = centred / (r.std() + 1e-4)
    elif scale != "none":
        raise ValueError(f"unknown scale_rewards {scale!r}")
    return centred.reshape(-1), torch.nan_to_num(std)


def policy_loss(logps: Any, old_logps: Any, advantages: Any, mask: Any, loss_type: str, epsilon: float, max_new_tokens: int,
                beta: float = 0.0, ref_logps: Any = None) -> tuple[Any, dict[str, Any]]:
    """(loss, {clip_fraction, kl}) from per-token log-probs [N, C], advantages [N] and the completion mask [N, C]."""
    import torch

    mask = mask.float()
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv
    per_token = -torch.min(unclipped, clipped)
    stats: dict[str, Any] = {}
    if beta > 0:
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + beta * kl
        stats["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1)).detach()
    is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))  # where the clip took the gradient away
    stats["clip_fraction"] = ((is_clipped.float() * mask).sum() / mask.sum().clamp(min=1)).detach()
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_new_tokens)
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    else:
        raise ValueError(f"unknown loss {loss_type!r}")
    return loss, stats


def completion_logps(model: Any, input_ids: Any, attention_mask: Any, completion_len: int, temperature: float, group: int = 1) -> Any:
    """[N, C] log-probs of the last C tokens of each row (the completions, prompts left-padded before them) at the
    sampling temperature; the LM head runs only at those positions. Positions come from the mask, as in generate.

    With `group` > 1 (rows laid out prompt-major, G rows per prompt, as GRPO's rollouts are) each prompt runs once:
    see shared_prompt_logps."""
    import torch.nn.functional as F

    if group > 1 and shares_prompt(model):
        return shared_prompt_logps(model, input_ids, attention_mask, completion_len, temperature, group)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    base = model.module if hasattr(model, "module") else model
    if keeps_logits(base):
        logits = model(**inputs, logits_to_keep=completion_len + 1).logits[:, :-1]
    else:
        logits = model(**inputs).logits[:, -completion_len - 1:-1]
    logits = logits.float() / temperature
    targets = input_ids[:, -completion_len:]
    return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


def prompts_once(processes: int, gradient_checkpointing: bool) -> bool:
    """What a run's config says about shares_prompt before any model exists (--estimate-memory, finetune's note)."""
    return processes == 1 and not gradient_checkpointing


def shares_prompt(model: Any) -> bool:
    """Whether the prompt-once forward applies: one process (DDP's forward must run once per backward), a
    transformers causal LM that returns its KV cache (not while gradient checkpointing, which turns the cache off)."""
    if hasattr(model, "module"):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # what transformers' is_gradient_checkpointing (renamed is_activation_checkpointing in 5.x) computes, under any name
    return keeps_logits(base) and not any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules())


def shared_prompt_logps(model: Any, input_ids: Any, attention_mask: Any, completion_len: int, temperature: float, group: int) -> Any:
    """completion_logps with each prompt computed once for its G completions instead of G times.

    The B distinct prompts run once with the cache on; the cache is repeated G times along the batch (a copy, inside
    the autograd graph, so the completions' gradients flow back into the prompt's keys and values as in the full
    forward) and the N = B x G completions run on top of it. Same log-probs and gradients as the full forward (tested);
    the forward and backward cover B x P + N x C tokens instead of N x (P + C): on sentiment prompts (~80 tokens)
    with 8-token answers and G = 8, about a fifth."""
    import torch
    import torch.nn.functional as F

    width = input_ids.shape[1] - completion_len
    prompt_mask = attention_mask[::group, :width]
    out = model(input_ids=input_ids[::group, :width], attention_mask=prompt_mask,
                position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True, logits_to_keep=1)
    logits = [out.logits[:, -1:].repeat_interleave(group, dim=0)]  # predicts each completion's first token
    if completion_len > 1:
        cache = out.past_key_values
        cache.batch_repeat_interleave(group)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, width:-1]
        logits.append(model(input_ids=input_ids[:, width:-1], attention_mask=attention_mask[:, :-1], position_ids=positions,
                            past_key_values=cache, use_cache=True).logits)
    logits = torch.cat(logits, dim=1).float() / temperature
    return -F.cross_entropy(logits.transpose(1, 2), input_ids[:, width:], reduction="none")


@dataclass
class RolloutBatch:
    """One micro-batch's rollouts, scored: what the k steps that use it need (CPU tensors)."""

    input_ids: Any  # [N, P + C]: left-padded prompt, then the completion, right-padded
    attention_mask: Any
    completion_mask: Any  # [N, C]
    advantages: Any  # [N]
    old_logps: Any  # [N, C] or None (k = 1: the step's own log-probs, detached)
    stats: dict[str, float]  # the rollouts' reward and length metrics, logged at every step that uses them


class GRPOLoss(LoggedParts):
    """`TrainJob.loss_fn` of --objective grpo: rollouts, rewards, advantages and the clipped policy loss per micro-batch."""

    def __init__(self, prompts: Any, rollouts: Any, rewards: list[Reward], weights: list[float], rl: RLConfig, *, tokenizer: Any,
                 request: Callable[..., Any], pad_id: int, seed: int, grad_accum: int, out: Path, start_step: int = 0, process: int = 0,
                 main: bool = True, save_every: int = 0, eval_prompts: Any = None) -> None:
        super().__init__()
        self.request, self.prompts_eval = request, eval_prompts  # request: inference's RolloutRequest (training does not import inference)
        self.prompts, self.rollouts, self.rewards, self.rl, self.tokenizer = prompts, rollouts, rewards, rl, tokenizer
        self.weights = weights or [1.0] * len(rewards)
        self.pad_id, self.seed, self.grad_accum, self.out, self.process, self.main = pad_id, seed, grad_accum, Path(out), process, main
        self.micro = start_step * grad_accum  # micro-batches done: which step (and seed) comes next
        self.save_every = save_every
        self.buffers: dict[int, RolloutBatch] = {}
        self.synced: int | None = None  # the step whose weights the rollouts backend has
        self.last_call: float | None = None
        self.rollout_seconds = 0.0
        self.speeds = {"rollout_tokens_per_s": 0.0, "train_tokens_per_s": 0.0}
        if main and start_step:
            _truncate_log(self.out / ROLLOUTS_LOG, start_step)

    def __call__(self, model: Any, batch: dict[str, Any]) -> Any:
        import torch

        now = time.perf_counter()
        step, j = divmod(self.micro, self.grad_accum)
        self.micro += 1
        k = self.rl.steps_per_generation
        cycle = step - step % k
        trained = None
        if step == cycle:
            self._time_train(now)
            self.buffers[j] = self.generate(model, [int(i) for i in batch["index"]], step, j)
            trained = time.perf_counter()
            if k > 1:
                self._keep(cycle, j)
        elif j not in self.buffers:  # resumed in the middle of a cycle: its rollouts were kept on disk
            self.buffers[j] = self._load(cycle, j)
        rb = self.buffers[j]
        device = next(model.parameters()).device
        ids, mask, cmask = rb.input_ids.to(device), rb.attention_mask.to(device), rb.completion_mask.to(device)
        logps = completion_logps(model, ids, mask, cmask.shape[1], self.rl.temperature, self.rl.num_generations)
        old = logps.detach() if rb.old_logps is None else rb.old_logps.to(device)
        ref = None
        if self.rl.beta > 0:
            ref = self._reference(model, ids, mask, cmask.shape[1])
        loss, stats = policy_loss(logps, old, rb.advantages.to(device), cmask, self.rl.loss, self.rl.epsilon, self.rl.max_new_tokens,
                                  self.rl.beta, ref)
        self.keep({**{name: torch.tensor(v) for name, v in rb.stats.items()}, **stats, **{k: torch.tensor(v) for k, v in self.speeds.items()}})
        self._train_tokens = int(mask.sum())
        if trained is None:
            self._time_train(now)
        return loss

    def _time_train(self, now: float) -> None:
        """Train tokens/s: the time since the previous call less its rollouts (forward, backward, optimizer step)."""
        if self.last_call is not None:
            seconds = now - self.last_call - self.rollout_seconds
            self.speeds["train_tokens_per_s"] = round(getattr(self, "_train_tokens", 0) / max(seconds, 1e-9), 1)
        self.last_call, self.rollout_seconds = now, 0.0

    def generate(self, model: Any, rows: list[int], step: int, micro: int) -> RolloutBatch:
        """Sample, score and lay out one micro-batch's rollouts."""
        import torch

        rl, g = self.rl, self.rl.num_generations
        t0 = time.perf_counter()
        policy = model.module if hasattr(model, "module") else model
        if self.synced != step:  # weights change only between optimizer steps, not between a step's micro-batches
            self.rollouts.sync(policy)
            self.synced = step
        seed = rollout_seed(self.seed, step, micro, self.process)
        rows = list(rows)
        completions, texts, values = self._sample(rows, seed, step)
        first_zero = int(self._zero(values).sum())
        resampled = self._resample(rows, completions, texts, values, seed, step) if rl.zero_signal == "resample" and first_zero else 0
        seconds = time.perf_counter() - t0
        self.rollout_seconds += seconds
        n_tokens = sum(len(c) for c in completions)
        self.speeds["rollout_tokens_per_s"] = round(n_tokens / max(seconds, 1e-9), 1)
        table = _table(values)
        total = self._total(table)
        advantages, group_std = group_advantages(total, g, rl.scale_rewards)
        zero = group_std == 0
        stops = set(getattr(self.rollouts, "stop_ids", None) or [self.tokenizer.eos_token_id])
        ended = [bool(c) and c[-1] in stops for c in completions]
        stats = {"reward": float(total.mean()), "reward_std": float(group_std.mean()),
                 **{f"reward/{r.name}": _nanmean(table[k]) for k, r in enumerate(self.rewards)},
                 "completion_length": n_tokens / len(completions),
                 "clipped_ratio": sum(1 for c, e in zip(completions, ended, strict=True) if not e and len(c) >= rl.max_new_tokens) / len(completions),
                 # x grad_accum: the logged mean over micro-batches is then the count per optimizer step
                 "zero_signal_groups": float(first_zero) * self.grad_accum}
        if rl.zero_signal == "resample":
            stats["resampled_groups"] = float(resampled) * self.grad_accum
        ids, mask, cmask = self._layout([self.prompts.prompt_ids(i) for i in rows], completions, g)
        if rl.zero_signal != "keep":
            cmask[zero.repeat_interleave(g)] = 0  # out of the token average: no gradient and no dilution of the others
        old = None
        if rl.steps_per_generation > 1:  # the sampling policy's log-probs: logp_old of every step these rollouts serve
            device = next(model.parameters()).device
            with torch.no_grad():
                old = completion_logps(model, ids.to(device), mask.to(device), cmask.shape[1], rl.temperature, g).float().cpu()
        if self.main and rl.log_rollouts_every and (step == 0 or (step + 1) % rl.log_rollouts_every == 0):
            self._log(step + 1, rows, texts, values, total, advantages)
        return RolloutBatch(ids, mask, cmask, advantages, old, stats)

    def _sample(self, rows: list[int], seed: int, step: int) -> tuple[list[list[int]], list[str], list[list[float | None]]]:
        """G completions of each row (prompt-major), their texts, and each reward's values [R][N]."""
        g = self.rl.num_generations
        request = self.request(prompts=[self.prompts.prompt_ids(i) for i in rows], num_generations=g, max_new_tokens=self.rl.max_new_tokens,
                               temperature=self.rl.temperature, top_p=self.rl.top_p, seed=seed)
        completions = self.rollouts.generate(request)
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        prompts = [self.prompts.prompt(i) for i in rows for _ in range(g)]
        names = sorted({c for i in rows for c in self.prompts.columns(i)})
        columns = {c: [self.prompts.columns(i).get(c) for i in rows for _ in range(g)] for c in names}
        wheres = [self.prompts.where(i) for i in rows for _ in range(g)]
        return completions, texts, score(self.rewards, prompts, texts, columns, step + 1, wheres)

    def _total(self, table: Any) -> Any:
        """[N] weighted sum of the rewards' table (`_table`); None counts as 0 in the sum (TRL)."""
        import torch

        return torch.nansum(table * torch.tensor(self.weights, dtype=torch.float32).unsqueeze(1), dim=0)

    def _zero(self, values: list[list[float | None]]) -> Any:
        """[groups] True where a group's rewards are all equal (no signal)."""
        return group_advantages(self._total(_table(values)), self.rl.num_generations, "none")[1] == 0

    def _resample(self, rows: list[int], completions: list[list[int]], texts: list[str], values: list[list[float | None]],
                  seed: int, step: int) -> int:
        """DAPO's dynamic sampling, in place: zero-signal groups replaced by groups of other prompts that carry a signal.
        Each round samples fresh rows (drawn under the micro-batch's seed: a resumed run draws the same) for the groups
        still without signal. Returns how many were replaced."""
        import random

        g, replaced = self.rl.num_generations, 0
        n, taken = len(self.prompts), set(rows)
        pool = [i for i in random.Random(seed).sample(range(n), min(n, len(rows) * (self.rl.resample_rounds + 1))) if i not in taken]
        for round_ in range(1, self.rl.resample_rounds + 1):
            slots = [s for s, z in enumerate(self._zero(values).tolist()) if z]
            fresh, pool = pool[:len(slots)], pool[len(slots):]
            if not slots or not fresh:
                break
            new_c, new_t, new_v = self._sample(fresh, rollout_seed(seed, round_, 0, 0), step)
            for t, z in enumerate(self._zero(new_v).tolist()):
                if z:
                    continue
                s = slots.pop(0)
                rows[s] = fresh[t]
                span, src = slice(s * g, (s + 1) * g), slice(t * g, (t + 1) * g)
                completions[span], texts[span] = new_c[src], new_t[src]
                for mine, theirs in zip(values, new_v, strict=True):
                    mine[span] = theirs[src]
                replaced += 1
        return replaced

    def _layout(self, prompts: list[list[int]], completions: list[list[int]], g: int) -> tuple[Any, Any, Any]:
        import torch

        width = max(len(p) for p in prompts)
        clen = max(1, max(len(c) for c in completions))
        n = len(completions)
        ids = torch.full((n, width + clen), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width + clen), dtype=torch.long)
        cmask = torch.zeros((n, clen), dtype=torch.long)
        for k, c in enumerate(completions):
            p = prompts[k // g]
            ids[k, width - len(p):width] = torch.tensor(p)
            mask[k, width - len(p):width + len(c)] = 1
            if c:
                ids[k, width:width + len(c)] = torch.tensor(c)
                cmask[k, :len(c)] = 1
        return ids, mask, cmask

    def _reference(self, model: Any, ids: Any, mask: Any, clen: int) -> Any:
        """Per-token log-probs under the reference: the policy with its LoRA adapter disabled, without gradients."""
        import contextlib

        import torch

        base = model.module if hasattr(model, "module") else model
        off = base.disable_adapter() if hasattr(base, "disable_adapter") else contextlib.nullcontext()
        with torch.no_grad(), off:
            return completion_logps(base, ids, mask, clen, self.rl.temperature, self.rl.num_generations)

    def _log(self, step: int, rows: list[int], texts: list[str], values: list[list[float | None]], total: Any, adv: Any) -> None:
        """rollouts.jsonl: what the model wrote and what it was rewarded, so people can read what it learns."""
        g = self.rl.num_generations
        lines = []
        for k, text in enumerate(texts):
            lines.append(json.dumps({"step": step, "row": rows[k // g], "prompt": self.prompts.prompt(rows[k // g]), "completion": text,
                                     "rewards": {r.name: values[m][k] for m, r in enumerate(self.rewards)},
                                     "reward": round(float(total[k]), 6), "advantage": round(float(adv[k]), 6)}))
        with open(self.out / ROLLOUTS_LOG, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def _keep(self, cycle: int, micro: int) -> None:
        """Rollouts that later steps reuse, on disk, so --resume in the middle of a cycle finds them."""
        import torch

        folder = self.out / BUFFERS
        folder.mkdir(exist_ok=True)
        with atomic_path(folder / f"{cycle}-{micro}-{self.process}.pt") as tmp:
            torch.save(self.buffers[micro].__dict__, tmp)
        horizon = cycle - self.rl.steps_per_generation - 3 * self.save_every if self.save_every else None
        for old in folder.glob(f"*-{micro}-{self.process}.pt"):
            if horizon is not None and int(old.name.split("-")[0]) < horizon:
                old.unlink(missing_ok=True)

    def _load(self, cycle: int, micro: int) -> RolloutBatch:
        import torch

        from llmkit.errors import UsageError

        path = self.out / BUFFERS / f"{cycle}-{micro}-{self.process}.pt"
        if not path.exists():
            raise UsageError(f"--resume: the rollouts of step {cycle + 1} ({path}) are gone; rl.steps_per_generation > 1 reuses them. "
                             "Start the run again (--overwrite)")
        return RolloutBatch(**torch.load(path, weights_only=True))

    def evaluate(self, model: Any, loader: Any, accelerator: Any = None) -> dict[str, float]:
        """Greedy answers to the held-out prompts: mean reward and pass rate (every applicable reward >= 1)."""
        import torch

        rows = [int(i) for batch in loader for i in batch["index"]]
        result = greedy_scores(model, self.tokenizer, self.prompts_eval, rows, self.rewards, self.weights, self.rl.max_new_tokens,
                               getattr(self.rollouts, "stop_ids", None))
        # every process scores its share; all of them must see the same numbers (the best-model decision is shared).
        # Accelerate pads the last shares with repeated rows: each row counts once, by its index.
        per_row = torch.tensor([[float(i) for i in rows], result["totals"], [float(p) for p in result["passed"]]], dtype=torch.float64).t()
        if accelerator is not None and accelerator.num_processes > 1:
            per_row = accelerator.gather(per_row.to(accelerator.device)).cpu()
        once = {int(r[0]): (float(r[1]), float(r[2])) for r in per_row}
        return {"reward": sum(v[0] for v in once.values()) / len(once), "pass_rate": sum(v[1] for v in once.values()) / len(once),
                "prompts": len(once)}


def greedy_scores(model: Any, tokenizer: Any, prompts: Any, rows: list[int], rewards: list[Reward], weights: list[float],
                  max_new_tokens: int, stop_ids: list[int] | None = None, batch_size: int = 16) -> dict[str, Any]:
    """Greedy completions of `rows` of a PromptSet, scored: mean weighted reward, pass rate, each reward's mean."""
    import torch

    base = model.module if hasattr(model, "module") else model
    device = next(base.parameters()).device
    stops = sorted(set(stop_ids or []) | {tokenizer.eos_token_id})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    was_training = base.training
    base.eval()
    texts = []
    try:
        for a in range(0, len(rows), batch_size):
            chunk = [prompts.prompt_ids(i) for i in rows[a:a + batch_size]]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            with torch.no_grad():
                out = base.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                    eos_token_id=stops, pad_token_id=pad, use_cache=True)
            for row in out[:, width:].tolist():
                cut = next((k for k, t in enumerate(row) if t in stops), len(row))
                texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    finally:
        if was_training:
            base.train()
    names = sorted({c for i in rows for c in prompts.columns(i)})
    columns = {c: [prompts.columns(i).get(c) for i in rows] for c in names}
    values = score(rewards, [prompts.prompt(i) for i in rows], texts, columns, 0, [prompts.where(i) for i in rows])
    w = weights or [1.0] * len(rewards)
    totals = [sum(wk * (v[k] or 0.0) for wk, v in zip(w, values, strict=True)) for k in range(len(rows))]
    passed = [all(v[k] is None or v[k] >= 1.0 for v in values) for k in range(len(rows))]
    n = max(len(rows), 1)
    return {"reward": sum(totals) / n, "pass_rate": sum(passed) / n, "completions": texts, "totals": totals, "passed": passed,
            "per_reward": {r.name: _nanmean_list([v[k] for k in range(len(rows))]) for r, v in zip(rewards, values, strict=True)}}


def _table(values: list[list[float | None]]) -> Any:
    """[R, N] float tensor of the rewards' values, None as NaN."""
    import torch

    return torch.tensor([[float("nan") if v is None else v for v in vals] for vals in values], dtype=torch.float32)


def _nanmean(t: Any) -> float:
    import torch

    ok = ~torch.isnan(t)
    return float(t[ok].mean()) if bool(ok.any()) else 0.0


def _nanmean_list(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _truncate_log(path: Path, step: int) -> None:
    """A resumed run logs its steps again: drop what the stopped run logged after its checkpoint."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
