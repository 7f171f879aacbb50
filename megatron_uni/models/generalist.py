"""Uni-Perceiver: one shared encoder, every task scored as input-vs-target matching.

Shape legend: R rows, S row length, s = S (or S/tp under sequence parallelism), h hidden.

    stage 0 (pre_process):   PackedBatch --InputEmbedding--> [s, R, h]
    every stage:             [s, R, h] --TransformerBlock (this stage's layers)--> [s, R, h]
    last stage (post_process): hidden --MatchingHead(batch)--> loss sum, count, metrics

Every stage receives the whole (small) PackedBatch: each rebuilds the attention mask from the
metadata, the first embeds, the last reads the query/target positions and labels. Model code
creates no process groups: they come in through ``pg_collection``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.enums import ModelType
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_uni.config import Config
from megatron_uni.batch import PackedBatch, attention_mask
from megatron_uni.models.heads import MatchingHead
from megatron_uni.models.layer_spec import encoder_block_spec
from megatron_uni.models.embeddings import InputEmbedding
from megatron_uni.models.encoder import EncoderBlock
from megatron_uni.moe.conditions import RoutingConditions
from megatron_uni.moe.tracker import RoutingTracker


class UniPerceiver(MegatronModule):
    """One pipeline stage of the generalist encoder (the whole model when PP = 1)."""

    def __init__(
        self,
        config: TransformerConfig,
        cfg: Config,
        pre_process: bool = True,
        post_process: bool = True,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ) -> None:
        super().__init__(config=config)
        pg_collection = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
        self.pre_process = pre_process
        self.post_process = post_process
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        # Read by finalize_model_grads under PP: no weight is shared between first and last stage.
        self.share_embeddings_and_output_weights = False
        tp = pg_collection.tp.size()
        if pre_process:
            # named `tokenizer` as in the reference (and in every checkpoint's keys)
            self.tokenizer = InputEmbedding(config, cfg.model, tp)
        # Sequence-parallel slice of the routing conditions this stage's routers see.
        self.sp_rank = pg_collection.tp.rank() if config.sequence_parallel else 0
        self.sp_size = tp if config.sequence_parallel else 1
        # Where this stage's routers report losses and expert counts (moe/tracker.py).
        self.routing_tracker = RoutingTracker()
        self.encoder = EncoderBlock(
            config=config,
            spec=encoder_block_spec(
                config,
                cfg,
                get_transformer_layer_offset(config),
                get_num_layers_to_build(config),
                self.routing_tracker,
                pg_collection.tp,
            ),
            post_layer_norm=False,
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=pg_collection,
        )
        if post_process:
            self.head = MatchingHead(config, cfg.model, pg_collection.dp)

    def set_input_tensor(self, input_tensor: Any) -> None:
        """Pipeline schedules hand the previous stage's output in here."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.encoder.set_input_tensor(input_tensor)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Encoder output ``[s, R, h]`` of this stage (the last stage's goes to :meth:`loss`).

        The routing conditions are built from this micro-batch and passed down as an argument
        (moe/conditions.py): a recomputed forward replays its own micro-batch's."""
        conditions = RoutingConditions.from_batch(batch, self.sp_rank, self.sp_size)
        hidden = self.tokenizer(batch) if self.pre_process else None
        return self.encoder(hidden, attention_mask(batch), conditions)

    def loss(
        self, batch: PackedBatch, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Loss sum, query count, metric sums of one micro-batch (last stage only)."""
        return self.head(hidden, batch)


def build_model(cfg: Config, use_cpu: bool, pg_collection: Optional[ProcessGroupCollection] = None
                ) -> UniPerceiver:
    """This rank's stage of the model for ``cfg`` (process groups must be initialised)."""
    from megatron.core import parallel_state  # noqa: PLC0415

    from megatron_uni.config.to_mcore import transformer_config  # noqa: PLC0415

    # Our losses are sums with counts (see heads.py): megatron divides by the global count.
    config = transformer_config(
        cfg, use_cpu=use_cpu, calculate_per_token_loss=True, own_experts=True
    )
    return UniPerceiver(
        config,
        cfg,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        pg_collection=pg_collection,
    )


def build_placed_model(cfg: Config, runtime: Any) -> tuple[torch.nn.Module, UniPerceiver]:
    """This rank's stage on its device and in its precision: (module to run, the bare model).

    bf16/fp16 wrap the model in megatron's ``Float16Module``; LayerScale stays fp32 (reference).
    One chunk per rank: virtual pipeline stages are refused.
    """
    from megatron_uni.config import ConfigError  # noqa: PLC0415

    if cfg.parallel.vpp is not None:
        raise ConfigError(
            "the model is built as one chunk per rank; virtual pipeline stages are not "
            "supported yet", field="parallel.vpp", value=cfg.parallel.vpp,
            fix="set parallel.vpp=null (checkpoints load under any layout)",
        )
    model = build_model(cfg, use_cpu=runtime.use_cpu, pg_collection=runtime.pgs)
    if not runtime.use_cpu:
        model.cuda(torch.cuda.current_device())
    module: torch.nn.Module = model
    if model.config.bf16 or model.config.fp16:
        from megatron.core.transformer.module import Float16Module  # noqa: PLC0415

        module = Float16Module(model.config, model)
        for name, param in model.named_parameters():
            if name.endswith(".gamma"):
                param.data = param.data.float()
    return module, model
