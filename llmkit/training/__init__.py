"""Training: the run lifecycle, THE loop, checkpoints, the run folder, losses, evaluation, and what they share.

- `lifecycle`: one run from guard to publish: resolve, resume check, accelerator, data, seed, record, train
- `loop`: THE training loop (`fit`), shared by every objective
- `checkpoints`: save, load, rotate, best, RNG, fsync
- `outputs`: the run folder's life: guard, start, stop, publish (llmkit.json, loss.png, model card)
- `evaluation`: THE evaluation path: training-time eval, evaluate, distill's report, quantize's gate
- `losses`, `chunked_loss`: KD losses; the LM head and cross-entropy in chunks
- `preference`: DPO, IPO, SimPO, ORPO losses and the cached reference
- `grpo`, `rewards`: learning from rewards (GRPO, Dr. GRPO, DAPO) on the one loop; built-in and user reward functions
- `students`: students cut from a teacher (layer choice, importance)
- `sharding`, `speedups`, `memory`, `trackers`: FSDP; --compile and Liger; --estimate-memory; --report-to
"""

from llmkit import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "lifecycle": ["Objective", "Run", "resolve_precision", "run"],
    "loop": ["TrainJob", "TrainResult", "fit"],
    "evaluation": ["evaluate_examples", "evaluate_model"],
    "memory": ["estimate_run"],
    "grpo": ["GRPOLoss", "greedy_scores"],
    "rewards": ["load_rewards"],
    "students": ["LayerScores", "choose_layers", "layer_importance", "student_from_layers"],
})
