"""Baselines for ``tools.bench_step`` that are not our model nor megatron-core's: a tiny
pre-LN encoder of the benchmark's shape in plain torch, with its linears either

- dense (``ref-dense``: the yardstick for the two below, same code, no experts),
- the reference's per-sample merged-weight MoE (``ref-merged``): written for the benchmark from
  the paper's description (reference/uni-perceiver-moe.md, section 2), not from its code. Each
  row of the micro-batch is one sample with one routing condition; the condition's gate
  (Linear(8 -> h), LayerNorm, Linear(h -> E) in fp32, top-k, softmax over the chosen) gives
  ``W_r = sum_j g_rj * W[e_rj]`` per sample and linear map, then one ``torch.bmm``. Experts on
  qkv / out / fc1 / fc2, out reusing qkv's decision and fc2 fc1's, as in the reference;
- DeepSpeed-MoE's ``deepspeed.moe.layer.MoE`` in place of the FFN (``deepspeed-moe``; token
  top-k gating, experts on fc1/fc2 only, the attention dense), where deepspeed imports.

Shape legend: R rows (samples), S tokens per row, h hidden, f ffn, E experts, k top-k.
The loss is a fixed random projection of the output (the head is not what is measured).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NUM_CONDITIONS = 6  # the reference's distinct attribute vectors
ATTRIBUTE_BITS = 8


class MergedGate(nn.Module):
    """Attribute gate of one routing decision: per-row condition -> (top-k experts, weights)."""

    def __init__(self, hidden: int, num_experts: int, topk: int) -> None:
        super().__init__()
        self.embed = nn.Linear(ATTRIBUTE_BITS, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.logits = nn.Linear(hidden, num_experts, bias=False)
        self.topk = topk

    def forward(self, attributes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``attributes [R, 8]`` -> experts ``[R, k]`` (long), gates ``[R, k]`` (fp32)."""
        logits = self.logits(self.norm(self.embed(attributes))).float()
        top, experts = logits.topk(self.topk, dim=-1)
        return experts, top.softmax(dim=-1)


class MergedLinear(nn.Module):
    """``E`` experts of ``in -> out``; per sample the k chosen merge into one weight, one bmm."""

    def __init__(self, num_experts: int, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_experts, fan_out, fan_in) / math.sqrt(fan_in))
        self.bias = nn.Parameter(torch.zeros(num_experts, fan_out))

    def forward(self, x: torch.Tensor, route: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``x [R, S, in]`` -> ``[R, S, out]``."""
        experts, gates = route
        g = gates.to(x.dtype)
        w = (g[..., None, None] * self.weight[experts]).sum(1)  # [R, out, in]
        b = (g[..., None] * self.bias[experts]).sum(1)  # [R, out]
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


class DenseLinear(nn.Linear):
    def forward(self, x: torch.Tensor, route: Any = None) -> torch.Tensor:  # noqa: ARG002
        return super().forward(x)


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, kind: str, num_experts: int,
                 topk: int) -> None:
        super().__init__()
        self.heads = heads
        self.kind = kind
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)

        def linear(fan_in: int, fan_out: int) -> nn.Module:
            if kind == "merged":
                return MergedLinear(num_experts, fan_in, fan_out)
            return DenseLinear(fan_in, fan_out)

        self.qkv, self.out = linear(hidden, 3 * hidden), linear(hidden, hidden)
        if kind == "merged":
            self.attn_gate = MergedGate(hidden, num_experts, topk)
            self.mlp_gate = MergedGate(hidden, num_experts, topk)
        if kind == "deepspeed":
            from deepspeed.moe.layer import MoE  # noqa: PLC0415

            expert = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))
            self.moe = MoE(hidden_size=hidden, expert=expert, num_experts=num_experts, ep_size=1,
                           k=topk, capacity_factor=float(num_experts), eval_capacity_factor=float(num_experts),
                           min_capacity=0, drop_tokens=False)
        else:
            self.fc1, self.fc2 = linear(hidden, ffn), linear(ffn, hidden)

    def forward(self, x: torch.Tensor, attributes: torch.Tensor) -> torch.Tensor:
        r, s, h = x.shape
        attn_route = self.attn_gate(attributes) if self.kind == "merged" else None
        qkv = self.qkv(self.norm1(x), attn_route).view(r, s, 3, self.heads, h // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(r, s, h)
        x = x + self.out(a, attn_route)
        y = self.norm2(x)
        if self.kind == "deepspeed":
            y, _, _ = self.moe(y)
            return x + y
        mlp_route = self.mlp_gate(attributes) if self.kind == "merged" else None
        return x + self.fc2(F.gelu(self.fc1(y, mlp_route)), mlp_route)


class RefEncoder(nn.Module):
    """``layers`` pre-LN encoder layers; ``kind``: dense | merged | deepspeed."""

    def __init__(self, hidden: int, layers: int, heads: int, ffn: int, kind: str = "dense",
                 num_experts: int = 8, topk: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            _Layer(hidden, heads, ffn, kind, num_experts, topk) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor, attributes: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, attributes)
        return self.norm(x)


def deepspeed_unavailable() -> str | None:
    """Why the deepspeed-moe variant cannot run here, or None when it can."""
    try:
        import deepspeed  # noqa: F401, PLC0415
        from deepspeed.moe.layer import MoE  # noqa: F401, PLC0415
    except Exception as err:  # noqa: BLE001 - any import failure means "skip, say why"
        return f"deepspeed is not importable ({type(err).__name__}: {str(err)[:160]})"
    return None


def init_deepspeed_comm(backend: str) -> None:
    """DeepSpeed's communication layer on top of the already started torch.distributed."""
    import deepspeed  # noqa: PLC0415

    deepspeed.init_distributed(dist_backend=backend)


def ref_inputs(rows: int, seq_len: int, hidden: int, device: torch.device, dtype: torch.dtype,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens ``[R, S, h]``, per-row attribute vectors ``[R, 8]``, loss projection ``[h]``)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, seq_len, hidden, generator=gen)
    table = torch.randint(0, 2, (NUM_CONDITIONS, ATTRIBUTE_BITS), generator=gen).float()
    attributes = table[torch.arange(rows) % NUM_CONDITIONS]
    proj = torch.randn(hidden, generator=gen) / math.sqrt(hidden)
    return (x.to(device=device, dtype=dtype), attributes.to(device=device, dtype=dtype),
            proj.to(device=device, dtype=dtype))
