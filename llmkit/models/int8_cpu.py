"""int8 folders run on CPU by llmkit: `torch._weight_int8pack_mm` for decoding, fbgemm for dynamic int8.

    >>> from llmkit.models.int8_cpu import load_for_cpu
    >>> model = load_for_cpu("runs/smollm2-int8")   # what `llmkit generate` / `evaluate` run on CPU

torchao 0.18's weight-only linear widens the whole int8 weight to the activations' dtype on every call and then
multiplies: on a CPU that is more memory traffic than the fp32 model, so the int8 folder decoded at 0.56x fp32
(issue 39). torch has the kernel that weight-only int8 is for, `_weight_int8pack_mm` (int8 weights read once,
widened in registers, per-channel scales applied to the fp32 accumulators); it needs bf16 activations to be fast
(with fp32 activations it is 5x slower than an fp32 matmul). Prompts and evaluation windows are many rows at once,
compute-bound: there the weight is de-quantized to fp32 for the call and one fp32 matmul does the rest.

Dynamic-activation layers (`--kernel dynamic`, classifiers' default on VNNI and AMX CPUs) run on fbgemm's int8 x
int8 matmul (`quantized::linear_dynamic`, VNNI / AMX instructions; activations quantized per call), which torch's
x86 builds ship; torchao 0.18's own CPU path for them ran MiniLM at 0.65x fp32, fbgemm at 1.40-1.71x (two runs). Where a torch build
lacks those ops the layers stay torchao's.

The folder is unchanged and plain transformers still loads it; only the in-memory layers differ. The weights, their
scales and so the quantization error are the same; the rounding of activations differs, so greedy text agrees with
plain transformers' except where two tokens are near-tied.
"""

from __future__ import annotations

from typing import Any

import torch

# Rows (tokens x sequences) up to which a call takes the int8 kernel. Its time grows with the rows (~18 us each at
# SmolLM2-135M's 576 x 1536 on a 2-core VNNI Xeon: 75 us for 1, 591 us for 32, 1161 us for 64), while de-quantizing
# costs a fixed ~450 us and then an fp32 matmul (750 us for 32 rows, 992 us for 64): the two cross near 48.
DECODE_ROWS = 32


class Int8PackedLinear(torch.nn.Module):
    """A weight-only int8 `nn.Linear` (symmetric, one scale per output channel) for CPU inference."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, at_load: bool = False) -> None:
        super().__init__()
        self.at_load = at_load  # quantized when loaded (a float head), not read from the folder's int8 weights
        self.out_features, self.in_features = qdata.shape
        self.register_buffer("qdata", aligned(qdata))
        self.register_buffer("scale_bf16", scale.reshape(-1).to(torch.bfloat16))
        self.register_buffer("scale", scale.reshape(-1, 1).float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= DECODE_ROWS:
            y = torch._weight_int8pack_mm(aligned(rows.to(torch.bfloat16)), self.qdata, self.scale_bf16).float()
        else:
            y = rows.float() @ (self.qdata.float() * self.scale).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only (int8pack_mm)"


class Int8DynamicLinear(torch.nn.Module):
    """A dynamic int8 `nn.Linear` (int8 weights, one scale per output channel; activations quantized per call) on
    fbgemm's prepacked int8 x int8 matmul."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        import warnings

        super().__init__()
        self.out_features, self.in_features = qdata.shape
        channels = scale.reshape(-1).double()
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated; fbgemm's prepack still takes only them
            warnings.simplefilter("ignore")
            weight = torch._make_per_channel_quantized_tensor(qdata.contiguous(), channels,
                                                              torch.zeros(len(channels), dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(weight, None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float().contiguous()
        # reduce_range: 7-bit activations, as torch's x86 dynamic quantization uses, so CPUs without VNNI cannot overflow
        y = torch.ops.quantized.linear_dynamic(rows, self.packed, True)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dynamic int8 (fbgemm)"


def fbgemm() -> bool:
    """Whether this torch has fbgemm's dynamic int8 linear (x86 builds do)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, contiguous at a 64-byte boundary. The kernel reads with aligned vector loads and crashes (SIGSEGV) on a
    tensor memory-mapped from safetensors at an odd offset (a tiny Gemma 3's q_proj sat at 24 mod 64) or on a view."""
    if t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    out = torch.empty(t.shape, dtype=t.dtype)  # torch's CPU allocator aligns to 64 bytes
    return out.copy_(t)


def torchao_int8(module: torch.nn.Module) -> bool:
    """A Linear whose weight is torchao's int8 tensor (as transformers loads a torchao int8 folder)."""
    return isinstance(module, torch.nn.Linear) and type(getattr(module, "weight", None)).__name__ == "Int8Tensor"


def packable(module: torch.nn.Module) -> str | None:
    """"weight-only" or "dynamic" for a torchao int8 Linear with per-channel symmetric scales (what `llmkit quantize`
    writes), by whether its activations are quantized too; None for anything else (left to torchao)."""
    if not torchao_int8(module):
        return None
    w = module.weight
    zero = getattr(w, "zero_point", None)
    if not (w.qdata.dim() == 2 and w.scale.numel() == w.qdata.shape[0] and (zero is None or not bool(zero.any()))):
        return None
    if getattr(w, "act_quant_kwargs", None) is None:
        return "weight-only"
    return "dynamic" if fbgemm() else None


def load_for_cpu(folder: Any, auto_cls: Any = None) -> Any:
    """An int8 folder (causal LM or classifier) as llmkit runs it on CPU: the layers left in float (norms, embeddings)
    in fp32 rather than a causal-LM folder's bf16, which CPUs without AVX-512-BF16 emulate; then `pack_for_cpu`."""
    from llmkit.models.int8 import load_int8

    return pack_for_cpu(load_int8(folder, auto_cls, dtype="float32"))


def pack_for_cpu(model: Any) -> Any:
    """Swap the model's weight-only int8 linears for `Int8PackedLinear`, its dynamic ones for `Int8DynamicLinear`
    and a float LM head for an int8 one; returns the model (changed in place).

    The head is tied to the embeddings in most small models, so the folder keeps it in float (transformers' torchao
    format quantizes `nn.Linear` weights only); quantized here at load time, one scale per vocabulary row. On
    SmolLM2-135M it is a fifth of the weights and, in fp32, half of each decoded token's memory traffic. The gate in
    `llmkit quantize` measures the model this way, so its perplexity includes the head's rounding.
    """
    swaps = [(parent, name, child, kind) for parent in model.modules() for name, child in parent.named_children()
             if (kind := packable(child))]
    for parent, name, child, kind in swaps:
        w = child.weight
        setattr(parent, name, (Int8PackedLinear if kind == "weight-only" else Int8DynamicLinear)(w.qdata, w.scale, child.bias))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is torch.nn.Linear and isinstance(head.weight, torch.nn.Parameter):
        w = head.weight.detach().float()
        scale = (w.abs().amax(1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        model.set_output_embeddings(Int8PackedLinear(torch.round(w / scale).to(torch.int8), scale, head.bias, at_load=True))
    return model


def packed_layers(model: Any) -> dict[str, int]:
    """How many layers run on each of llmkit's CPU kernels."""
    return {"torch._weight_int8pack_mm": sum(isinstance(m, Int8PackedLinear) for m in model.modules()),
            "fbgemm dynamic int8": sum(isinstance(m, Int8DynamicLinear) for m in model.modules())}


def int8_linears(model: Any) -> int:
    """The linear layers whose int8 weights came from the folder, whether torchao's or packed."""
    return sum(torchao_int8(m) or isinstance(m, Int8DynamicLinear) or (isinstance(m, Int8PackedLinear) and not m.at_load)
               for m in model.modules())
