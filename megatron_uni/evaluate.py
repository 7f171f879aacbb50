"""Evaluate Uni-Perceiver(-MoE) zero-shot on every eval set of the config.

    python -m megatron_uni.evaluate --config FILE checkpoint.load=DIR [key=value ...]
    torchrun --nproc-per-node 4 -m megatron_uni.evaluate --config FILE parallel.tp=2 ...

For each task with ``eval_shards`` (held-out tasks of weight 0 included): classification top-1 /
top-5 against the class names; retrieval R@1/5/10 image->text and text->image over the whole
eval set; captioning greedy decoding, corpus BLEU-4 and CIDEr-D; MLM masked-token accuracy. Any
parallel layout (TP, PP, EP, DP; a checkpoint loads under any of them) gives the same numbers.
Without ``checkpoint.load`` it evaluates the newest checkpoint of the run dir
(``checkpoint.save``, default ``<train.run_dir>/checkpoints``) and says so; with none there it
stops, unless ``--allow-random-weights`` asks for the random initial weights. Writes
``<train.run_dir>/eval.json`` (or ``--out``) on rank 0 and prints a table. Configuration and
checkpoint problems end with one clear line, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from megatron_uni.config import ConfigError, load_config
from megatron_uni.train import report_error, setup_logging

log = logging.getLogger("megatron_uni.evaluate")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated task names (default: every task with eval_shards)")
    parser.add_argument("--out", default=None,
                        help="report path (default <train.run_dir>/eval.json)")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="evaluate the random initial weights when there is no checkpoint "
                        "(checkpoint.load unset and none in the run dir)")
    parser.add_argument("--microbatches-per-call", type=int, default=8,
                        help="micro-batches per pipeline-schedule call")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. checkpoint.load=DIR")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_uni.training.checkpoint import CheckpointError, find_latest  # noqa: PLC0415
    from megatron_uni.data.readers import DataError  # noqa: PLC0415
    from megatron_uni.training.run_dir import RunDirError  # noqa: PLC0415

    try:
        cfg = load_config(args.config, args.overrides)
        setup_logging(cfg.logging.level)
        from megatron_uni.evaluation.evaluators import evaluation_tasks  # noqa: PLC0415

        tasks = args.tasks.split(",") if args.tasks else None
        try:
            names = evaluation_tasks(cfg, tasks)
        except ValueError as err:
            raise ConfigError(str(err), field="--tasks",
                              fix="name tasks that have eval_shards") from None
        if not names:
            raise ConfigError("no task has eval_shards: nothing to evaluate",
                              field="data.tasks", fix="set data.tasks.<name>.eval_shards")
        if args.microbatches_per_call < 1:
            raise ConfigError("must be >= 1", field="--microbatches-per-call",
                              value=args.microbatches_per_call)
        if not cfg.checkpoint.load and not args.allow_random_weights and find_latest(
                Path(cfg.save_dir())) is None:
            raise ConfigError(
                f"no checkpoint to evaluate: checkpoint.load is unset and {cfg.save_dir()} "
                "holds none", field="checkpoint.load",
                fix="set checkpoint.load=DIR, or pass --allow-random-weights to evaluate the "
                "random initial weights")
        return _run(cfg, names, args)
    except (ConfigError, CheckpointError, RunDirError) as err:
        return report_error(err)
    except DataError as err:  # past data.max_bad_samples, or nothing readable: on some ranks
        return report_error(err, every_rank=True)


def _run(cfg, names: list[str], args: argparse.Namespace) -> int:  # noqa: ANN001
    from megatron_uni.evaluation import run  # noqa: PLC0415
    from megatron_uni.parallel.initialize import initialize, shutdown  # noqa: PLC0415
    from megatron_uni.training.checkpoint import current_layout, find_latest  # noqa: PLC0415

    runtime = initialize(cfg)
    try:
        start = time.perf_counter()
        chunks = run.build_eval_model(cfg, runtime)
        step, checkpoint = None, None
        source = cfg.checkpoint.load or find_latest(Path(cfg.save_dir()))
        if source:
            if not cfg.checkpoint.load and runtime.is_main:
                log.info("no checkpoint.load given: evaluating the run dir's newest checkpoint "
                         "%s", source)
            step, checkpoint = run.load_weights(source, chunks, cfg)
        elif runtime.is_main:
            log.warning("--allow-random-weights: evaluating the RANDOM initial weights")
        results = run.evaluate_tasks(cfg, runtime, chunks, names,
                                     microbatches_per_call=args.microbatches_per_call)
        content = run.report(cfg, results, step=step, checkpoint=checkpoint,
                             layout={**current_layout(), "device": runtime.device.type},
                             seconds=round(time.perf_counter() - start, 2))
        if runtime.is_main:
            path = run.write_report(args.out or Path(cfg.train.run_dir) / "eval.json", content)
            print(run.format_table(content), flush=True)
            print(f"wrote {path}", flush=True)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
