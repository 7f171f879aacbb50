"""The pre-training recipes (configs/runs/pretrain_*.yaml) train on miniature copies of their
datasets, written in the layouts of README.md ("Dataset layouts") by the same commands a user
runs (tools.build_shards; img2dataset's own shard format for the web image-text sets).

Per model (MoE-B, MoE-L, dense B, dense L): stage 1 trains 16 steps, then stage 2 takes stage
1's weights (its checkpoint.load with checkpoint.finetune) and trains 16 steps from step 0. The recipe's task list, loss weights,
augmentation, MoE placement, optimizer and schedule stay; the test shrinks the model to
configs/models/debug.yaml's sizes and every task's batch, image and text size, and sets the
sampling weights so that each of the 16 steps draws another task (the draw of step k is a
function of (data.seed, k), megatron_uni/data/sampler.py): every task trains once per stage.
Also: ``--dry-run`` validates each recipe and lists its tasks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_uni.config import load_config
from megatron_uni.data.sampler import uniform, uniform_per_unit
from megatron_uni.data.text_tokenizer import get_tokenizer
from tests.multirank import run_ranks
from tests.unit.data.test_img2dataset import write_img2dataset
from tools import build_shards

REPO = Path(__file__).resolve().parents[2]
RUNS = REPO / "configs" / "runs"
RECIPES = sorted(p.stem for p in RUNS.glob("pretrain_*.yaml"))
ZEROSHOT = sorted(p.stem for p in RUNS.glob("zeroshot_*.yaml"))
STEPS = 16
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.ffn_hidden_size=256", "train.precision=fp32", "data.num_workers=0",
        "data.reader_streams=1", "data.shuffle_buffer=4", "logging.log_interval=1",
        "logging.tensorboard=false", "checkpoint.save_interval=0", "checkpoint.keep_last=1",
        "optim.warmup_steps=2"]


def _image(path: Path, rgb: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 32), rgb).save(path)


def _build(*argv: str) -> None:
    assert build_shards.main([*argv, "--shard-size", "4"]) == 0


def _coco(raw: Path, n: int) -> tuple[Path, Path]:
    images = [{"id": i, "file_name": f"{i:04d}.jpg"} for i in range(n)]
    annotations = [{"image_id": i, "caption": f"a photo of thing {i} seen from side {v}"}
                   for i in range(n) for v in range(2)]
    for i in range(n):
        _image(raw / "images" / f"{i:04d}.jpg", (30 * i % 256, 90, 20))
    (raw / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return raw / "captions.json", raw / "images"


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every dataset of the recipes, a few samples each, under one data.root."""
    tmp = tmp_path_factory.mktemp("recipes")
    raw, root = tmp / "raw", tmp / "data"
    for c, name in enumerate(["n01440764", "n01443537", "n01484850"]):  # ROOT/<wnid>/<image>
        for i in range(4):
            _image(raw / "in21k" / name / f"{name}_{i}.JPEG", (80 * c, 40 * i, 0))
    _build("imagefolder", str(raw / "in21k"), "--out", str(root / "imagenet21k"))
    (root / "imagenet21k" / "classes.txt").write_text("tench\ngoldfish\ngreat white shark\n")
    for dataset in ("kinetics700", "moments_in_time"):  # ROOT/<class>/<video>/<frames>
        for c, cls in enumerate(["abseiling", "air drumming"]):
            for v in range(3):
                for t in range(6):
                    _image(raw / dataset / cls / f"vid{v}" / f"{t:04d}.jpg", (40 * t, 100 * c, 0))
        _build("videos", str(raw / dataset), "--out", str(root / dataset))
    text = raw / "books.txt"
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_text("".join(f"sentence number {i} tells a short story about a cat\n"
                            for i in range(16)))
    _build("text", str(text), "--out", str(root / "bookswiki"))
    for dataset in ("coco", "visual_genome"):  # COCO-format captions JSON + image folder
        _build("coco", *map(str, _coco(raw / dataset, 8)), "--out", str(root / dataset))
    for dataset in ("yfcc", "cc12m", "cc3m", "sbu"):  # img2dataset output folders
        write_img2dataset(root / dataset, [f"{dataset} picture {i} of a dog" for i in range(8)],
                          per_shard=4)
    # the zero-shot evaluation sets (configs/tasks/zeroshot.yaml)
    for c, name in enumerate(["tench", "goldfish"]):  # ImageNet-1k val sorted into class folders
        for i in range(3):
            _image(raw / "in1k_val" / name / f"val_{i}.JPEG", (120 * c, 50 * i, 60))
    _build("imagefolder", str(raw / "in1k_val"), "--out", str(root / "imagenet1k"),
           "--prefix", "val")
    _build("coco", *map(str, _coco(raw / "coco_test", 6)), "--out", str(root / "coco"),
           "--prefix", "test5k")
    _build("coco", *map(str, _coco(raw / "flickr_test", 6)), "--out", str(root / "flickr30k"),
           "--prefix", "test")
    _build("videos", str(raw / "kinetics700"), "--out", str(root / "kinetics400"),
           "--prefix", "val")
    # The recipes score MLM and captioning against the whole CLIP vocabulary (target_set clip,
    # 49,408 targets a step); here against the words of the miniature data.
    tok = get_tokenizer()
    words = text.read_text() + " ".join(f"{d} picture of a dog photo thing seen from side"
                                         for d in ("yfcc", "cc12m", "cc3m", "sbu"))
    ids = sorted(set(tok.encode(words)) | set(range(10, 60)) | {tok.eot_id})
    (root / "mini_vocab.json").write_text(json.dumps(ids))
    return root


def _weights(recipe: str, start: int) -> list[str]:
    """Sampling weights under which steps start .. start+15 draw each task exactly once (the
    recipes sample per rank: one process is draw unit 0)."""
    cfg = load_config(RUNS / f"{recipe}.yaml")
    names = list(cfg.data.tasks)
    steps = np.arange(start, start + len(names), dtype=np.uint64)
    assert cfg.data.task_sampling in ("per_step", "per_rank")
    draws = (uniform(cfg.data.seed, steps) if cfg.data.task_sampling == "per_step"
             else uniform_per_unit(cfg.data.seed, steps, 0))
    u = np.sort(draws)
    edges = np.concatenate([[0.0], (u[:-1] + u[1:]) / 2, [1.0]])
    return [f"data.tasks.{n}.weight={float(w)!r}" for n, w in zip(names, np.diff(edges))]


def _shrink(recipe: str) -> list[str]:
    out = []
    for name, task in load_config(RUNS / f"{recipe}.yaml").data.tasks.items():
        t = f"data.tasks.{name}"
        out += [f"{t}.micro_batch_size=2", f"{t}.seq_len=64"]
        if task.type != "mlm":
            out.append(f"{t}.image_size=32")
        if task.type in ("mlm", "captioning"):
            out.append(f"{t}.target_set=mini_vocab.json")
        if task.type in ("mlm", "captioning", "retrieval"):
            out.append(f"{t}.max_text_len={24 if task.type == 'mlm' else 12}")
    return out


def _train(rank: int, world: int, argv: list[str]) -> int:
    from megatron_uni.train import main

    return main(argv)


def _run(recipe: str, root: Path, run_dir: Path, start: int, *extra: str) -> list[str]:
    argv = ["--config", str(RUNS / f"{recipe}.yaml"), f"data.root={root}",
            f"train.run_dir={run_dir}", f"train.steps={start + STEPS}", *TINY, *_shrink(recipe),
            *_weights(recipe, start), *extra]
    assert run_ranks(_train, 1, args=(argv,), timeout=300) == [0]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(start + 1, start + STEPS + 1))
    assert all(np.isfinite(r["loss"]) for r in records)
    return [r["task"] for r in records]


@pytest.mark.parametrize("model", ["moe_b", "moe_l", "dense_b", "dense_l"])
def test_recipe_stages_train_every_task(model: str, mini_root: Path, tmp_path: Path) -> None:
    stage1, stage2 = f"pretrain_{model}_stage1", f"pretrain_{model}_stage2"
    tasks = list(load_config(RUNS / f"{stage1}.yaml").data.tasks)
    assert len(tasks) == 16
    trained = _run(stage1, mini_root, tmp_path / "stage1", 0)
    assert sorted(trained) == sorted(tasks)
    # stage 2 from stage 1's weights (checkpoint.finetune: it starts again at step 0)
    trained = _run(stage2, mini_root, tmp_path / "stage2", 0,
                   f"checkpoint.load={tmp_path / 'stage1' / 'checkpoints'}")
    assert sorted(trained) == sorted(load_config(RUNS / f"{stage2}.yaml").data.tasks)


def test_dry_run_lists_tasks(mini_root: Path, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron_uni.train import main

    monkeypatch.setenv("WORLD_SIZE", "56")
    for recipe in RECIPES + ZEROSHOT:
        assert main(["--config", str(RUNS / f"{recipe}.yaml"), f"data.root={mini_root}",
                     "--dry-run"]) == 0, recipe
        out = capsys.readouterr().out
        lines = out.splitlines()
        tasks = load_config(RUNS / f"{recipe}.yaml").data.tasks
        assert len(tasks) == (16 if recipe in RECIPES else 21), recipe
        assert "dp 56" in out
        assert lines[-1] == f"config ok: {len(tasks)} tasks (dry run: nothing trained)"
        rows = {line.split()[0]: line.split() for line in lines
                if line.split() and line.split()[0] in tasks}
        assert len(rows) == len(tasks), recipe
        # every task's shards and target set are found in the miniature layouts
        assert all(row[10] == "ok:" for row in rows.values()), out
        batch = "720" if recipe.endswith("stage1") else "440"  # zero-shot: on stage 2
        assert rows["imagenet21k"][2] == "2.486" and rows["imagenet21k"][5] == batch, out


def _evaluate(rank: int, world: int, argv: list[str]) -> int:
    from megatron_uni.evaluate import main

    return main(argv)


def test_zero_shot_suite_evaluates(mini_root: Path, tmp_path: Path) -> None:
    config = RUNS / "zeroshot_moe_b.yaml"
    cfg = load_config(config)
    suite = [n for n, t in cfg.data.tasks.items() if t.eval_shards]
    assert suite == ["imagenet1k", "coco_caption_test", "coco_retrieval_test",
                     "flickr30k_retrieval_test", "kinetics400"]
    shrink = []
    for name in suite:
        t = f"data.tasks.{name}"
        shrink += [f"{t}.micro_batch_size=4", f"{t}.seq_len=64", f"{t}.image_size=32"]
    shrink += ["data.tasks.coco_caption_test.target_set=mini_vocab.json",
               "data.tasks.coco_caption_test.max_text_len=8",
               "data.tasks.coco_retrieval_test.max_text_len=12",
               "data.tasks.flickr30k_retrieval_test.max_text_len=12"]
    argv = ["--config", str(config), "--allow-random-weights", f"data.root={mini_root}",
            f"train.run_dir={tmp_path}", "checkpoint.load=null", *TINY, *shrink]
    assert run_ranks(_evaluate, 1, args=(argv,), timeout=300) == [0]
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert set(metrics) == set(suite)
    assert set(metrics["coco_caption_test"]) == {"bleu4", "cider"}
    assert set(metrics["imagenet1k"]) == {"top1", "top5"} == set(metrics["kinetics400"])
    assert metrics["flickr30k_retrieval_test"]["t2i_r10"] == 1.0  # 6 images: all within 10
