"""Zero-shot evaluation of the generalist model under any parallel layout.

- :mod:`~megatron_uni.evaluation.metrics`: top-k, recall@k both directions, corpus BLEU-4;
- :mod:`~megatron_uni.evaluation.forward`: forward-only passes through megatron's schedule that
  collect features from the last pipeline stage, in lockstep over ranks;
- :mod:`~megatron_uni.evaluation.inputs`: eval samples (with every reference caption) and the
  target-free input batches and "[SPE] text" batches evaluation runs;
- :mod:`~megatron_uni.evaluation.decoding`: greedy captioning with the prediction slots;
- :mod:`~megatron_uni.evaluation.evaluators`: one evaluator per task family;
- :mod:`~megatron_uni.evaluation.run`: model building, checkpoint loading, the eval.json report.

The entry point is ``python -m megatron_uni.evaluate``.
"""
