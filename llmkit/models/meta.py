"""Building a model without its weights: `--fsdp` under torchrun loads them once, on rank 0 (llmkit.training.sharding.load_once).

    >>> with building_empty(True):
    ...     model = from_pretrained_checked(AutoModelForCausalLM, ref, progress=False)   # llmkit.models: parameters on meta

Every other process builds the same model with its parameters on the meta device (shapes and dtypes, no bytes), never
opening a weights file, and receives its shard of rank 0's weights once the model is sharded (llmkit.training.sharding.shard).
The switch is a context variable rather than an argument because the model is built deep inside each objective
(finetune.build_model -> models.load_seq_cls / from_pretrained_checked / apply_adapter); those read `building()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

_EMPTY: ContextVar[bool] = ContextVar("llmkit_building_empty", default=False)


@contextlib.contextmanager
def building_empty(enabled: bool = True) -> Iterator[None]:
    """Inside, with `enabled`, llmkit's model loaders build models without their weights (`empty_model`)."""
    token = _EMPTY.set(enabled)
    try:
        yield
    finally:
        _EMPTY.reset(token)


def building() -> bool:
    """Whether this process builds its model empty, to receive rank 0's weights once sharded."""
    return _EMPTY.get()


def empty_model(auto_cls: Any, where: str, source: dict[str, Any], extra: dict[str, Any]) -> Any:
    """What `auto_cls.from_pretrained(where, **source, **extra)` would return, built without reading a weight: the same
    config (the same keyword arguments go into it), parameters on the meta device, in eval mode as from_pretrained leaves it.

    Buffers are built for real on CPU (accelerate's `include_buffers=False`): the non-persistent ones (Llama's rotary
    `inv_freq`, BERT's `position_ids`) are in no state dict, so rank 0 never sends them; they are computed here instead,
    exactly as rank 0 computed its own, and `shard` puts them back after materializing the parameters.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    loading_only = {"dtype", "ignore_mismatched_sizes", "quantization_config", "use_safetensors"}
    config = AutoConfig.from_pretrained(where, **{k: v for k, v in source.items() if k != "use_safetensors"},
                                        **{k: v for k, v in extra.items() if k not in loading_only})
    with init_empty_weights(include_buffers=False):
        model = auto_cls.from_config(config, dtype=extra.get("dtype"), trust_remote_code=source.get("trust_remote_code", False))
    # accelerate's context replaces every parameter registered under it, a tied LM head too: tie again as the config
    # says (SmolLM2's embeddings and head are one matrix); llmkit.training.sharding then follows rank 0, whose checkpoint decides
    model.tie_weights()
    return model.eval()
