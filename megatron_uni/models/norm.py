"""LayerNorm for megatron-core layer specs that also works under sequence parallelism.

megatron-core's torch fallback (``WrappedTorchNorm``) refuses ``sequence_parallel=True``, and MoE
with tensor parallelism requires sequence parallelism, so without Transformer Engine or Apex
there is no usable norm. Under sequence parallelism each tensor-parallel rank normalises its own
slice of the sequence; the weights are replicated, so their gradients are partial sums that
megatron's ``finalize_model_grads`` all-reduces over the tensor-parallel group for every parameter
flagged ``sequence_parallel``. That flag is all this class adds.
"""

from __future__ import annotations

import torch

from megatron.core.transformer.transformer_config import TransformerConfig


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` with megatron's norm signature and sequence-parallel grad flags.

    Shapes: ``[s, b, h] -> [s, b, h]`` (any leading dims).
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> None:
        if normalization != "LayerNorm" or zero_centered_gamma:
            raise ValueError(
                f"megatron_uni LayerNorm supports plain LayerNorm only, got "
                f"normalization={normalization!r}, zero_centered_gamma={zero_centered_gamma}"
            )
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel
