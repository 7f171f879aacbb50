"""Greedy caption decoding and target encoding on a tiny random model (one-rank child process).

- decoded captions are token lists of the task's vocabulary, without <end_of_text>, at most
  ``max_len`` long; a vocabulary whose best entry is always <end_of_text> gives empty captions;
- decoding agrees with teacher forcing: feeding the decoded caption back, every slot predicts the
  token decoding chose (the slot mechanism sees exactly what it saw while decoding);
- a shorter ``max_len`` gives a prefix of the longer decode;
- evaluation's separately encoded targets and target-free inputs give the features the same
  sequences get inside a training batch (one packed with inputs and targets).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from tests.multirank import run_ranks

REPO = Path(__file__).resolve().parents[3]


def _setup(root: str):
    from megatron_uni.config import load_config
    from megatron_uni.data.task_plan import plan_task
    from megatron_uni.evaluation.forward import ForwardRunner
    from megatron_uni.models.generalist import build_model
    from megatron_uni.data.text_tokenizer import get_tokenizer
    from megatron_uni.parallel.initialize import initialize

    cfg = load_config(REPO / "configs" / "runs" / "demo_data.yaml", [
        f"data.root={root}", "parallel.device=cpu", "model.init_method_std=0.2",
        "model.layer_scale_init=1.0", "data.tasks.image_caption.max_text_len=6",
    ])
    runtime = initialize(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, use_cpu=True)
    model.eval()
    runner = ForwardRunner([model], runtime.device)
    tok = get_tokenizer()
    plans = {name: plan_task(cfg, name, 0, 1, tok, need_train=False, need_eval=True)
             for name in ("image_caption", "image_cls")}
    return cfg, runner, tok, plans


def _check_decoding(rank: int, world: int, root: str) -> None:
    from megatron_uni.evaluation import inputs
    from megatron_uni.evaluation.decoding import greedy_decode
    from megatron_uni.evaluation.evaluators import EvalContext, encode_target_set

    cfg, runner, tok, plans = _setup(root)
    plan = plans["image_caption"]
    ctx = EvalContext(cfg, runner, tok, 0, 1)
    bank = encode_target_set(ctx, plan, [(t,) for t in plan.vocab], vocab=True)
    assert bank.shape == (len(plan.vocab), cfg.model.hidden_size)
    samples = list(inputs.eval_samples(cfg, plan, tok, 0, 1))[:5]
    clips = [inputs.clips_of(samples[:3]), inputs.clips_of(samples[3:])]  # two micro-batches

    decoded = greedy_decode(runner, plan, clips, bank, eot_id=tok.eot_id)
    assert [len(d) for d in decoded] == [3, 2]
    flat = [c for d in decoded for c in d]
    assert all(len(c) <= plan.max_text_len for c in flat)
    assert all(t in plan.vocab and t != tok.eot_id for c in flat for t in c)
    assert any(len(c) > 0 for c in flat)

    # Teacher forcing with the decoded captions reproduces every decision.
    length = plan.max_text_len
    for clip, captions in zip(clips, decoded):
        padded = torch.tensor([c + [tok.eot_id] * (length - len(c)) for c in captions])
        batch = inputs.caption_batch(plan, clip, padded)

        def extract(head, b, tokens):
            scores = head.features(tokens[b.loss.query_index]) @ bank.t()
            return torch.tensor(plan.vocab)[scores.argmax(1)]

        (forced,) = runner([batch], extract)
        forced = forced.view(-1, length)
        for i, c in enumerate(captions):
            expect = c + ([tok.eot_id] if len(c) < length else [])
            assert forced[i, : len(expect)].tolist() == expect, (i, c, forced[i])

    # A shorter limit decodes a prefix.
    short = greedy_decode(runner, plan, clips, bank, eot_id=tok.eot_id, max_len=2)
    assert [c for d in short for c in d] == [c[:2] for c in flat]

    # <end_of_text> first in the vocabulary and every entry alike: the first slot stops.
    eot_first = dataclasses.replace(plan, vocab=(tok.eot_id, *plan.vocab[:-1]))
    empty = greedy_decode(runner, eot_first, clips, torch.zeros_like(bank), eot_id=tok.eot_id)
    assert [c for d in empty for c in d] == [[]] * 5


def _check_encoding_matches_training_batches(rank: int, world: int, root: str) -> None:
    from megatron_uni.data.examples import make_micro_batch
    from megatron_uni.evaluation import inputs
    from megatron_uni.evaluation.evaluators import EvalContext, encode_target_set

    cfg, runner, tok, plans = _setup(root)
    plan = plans["image_cls"]
    ctx = EvalContext(cfg, runner, tok, 0, 1)
    samples = list(inputs.eval_samples(cfg, plan, tok, 0, 1))[:4]
    full = make_micro_batch(plan, [s.example for s in samples], np.random.default_rng(0),
                            train=False)

    def both(head, b, tokens):
        return head.features(tokens[b.loss.query_index]), head.features(tokens[b.loss.target_index])

    ((queries, targets),) = runner([full], both)
    bank = encode_target_set(ctx, plan, plan.class_names, vocab=False)
    (alone,) = runner([inputs.clip_batch(plan, samples)],
                      lambda head, b, tokens: head.features(tokens[b.loss.query_index]))
    torch.testing.assert_close(bank, targets, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, queries, rtol=1e-5, atol=1e-5)


def _demo(tmp_path: Path) -> str:
    from megatron_uni.data.demo import make_demo_data

    make_demo_data(tmp_path, seed=0, num_train=8, num_eval=6, num_train_shards=1)
    return str(tmp_path)


def test_greedy_decoding_is_bounded_and_matches_teacher_forcing(tmp_path: Path) -> None:
    run_ranks(_check_decoding, 1, args=(_demo(tmp_path),), timeout=180)


def test_eval_encoding_matches_training_batches(tmp_path: Path) -> None:
    run_ranks(_check_encoding_matches_training_batches, 1, args=(_demo(tmp_path),), timeout=180)
