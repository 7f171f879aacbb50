"""img2dataset's webdataset output read as it is, for captioning and retrieval.

img2dataset (output_format=webdataset) writes per shard ``00000.tar`` with members
``000000000.jpg``, ``000000000.txt`` (the caption) and ``000000000.json`` (url, key, status,
caption, sizes, ...), and beside it ``00000_stats.json`` and ``00000.parquet``; samples that
failed to download are only in the parquet, never in the tar. The test writes exactly that.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import webdataset
from PIL import Image

from megatron_uni.batch import Segment
from megatron_uni.config import Config, apply_overrides
from megatron_uni.data.loader import EvalLoader, MultiTaskLoader
from megatron_uni.data.text_tokenizer import get_tokenizer

CAPTIONS = ["a red square on white", "two dogs\nin the snow", "a blue car", "an old bridge",
            "green fields", "a cup of tea"]


def write_img2dataset(out: Path, captions: list[str], per_shard: int = 3) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for shard in range(0, len(captions), per_shard):
        number = shard // per_shard
        with webdataset.TarWriter(str(out / f"{number:05d}.tar")) as tar:
            for i in range(shard, min(shard + per_shard, len(captions))):
                key = f"{number:05d}{i % per_shard:04d}"
                buf = io.BytesIO()
                Image.new("RGB", (40, 30), (40 * i, 0, 0)).save(buf, format="JPEG")
                meta = {"url": f"https://example.com/{i}.jpg", "key": key, "status": "success",
                        "error_message": None, "width": 40, "height": 30,
                        "original_width": 400, "original_height": 300, "exif": "{}",
                        "sha256": "0" * 64, "caption": captions[i]}
                tar.write({"__key__": key, "jpg": buf.getvalue(), "txt": captions[i],
                           "json": json.dumps(meta)})
        (out / f"{number:05d}_stats.json").write_text(json.dumps(
            {"count": per_shard, "successes": per_shard, "failed_to_download": 1}))
        (out / f"{number:05d}.parquet").write_bytes(b"PAR1 not read by the loader PAR1")


def _cfg(root: Path, kind: str, *extra: str) -> Config:
    task = [f"type={kind}", "shards=0000?.tar", 'eval_shards="{00000..00001}.tar"', "seq_len=64",
            "image_size=32", "crop_pct=1.0", "micro_batch_size=6", "max_text_len=12", *extra]
    return apply_overrides(Config(), [f"data.root={root}", "data.reader_streams=1",
                                      *[f"data.tasks.t.{kv}" for kv in task]])


def test_captioning_reads_img2dataset_shards(tmp_path: Path) -> None:
    write_img2dataset(tmp_path / "cc3m", CAPTIONS)
    tok = get_tokenizer()
    vocab = sorted(set(tok.encode(" ".join(CAPTIONS))) | {tok.eot_id})
    (tmp_path / "cc3m" / "vocab.json").write_text(json.dumps(vocab))
    cfg = _cfg(tmp_path / "cc3m", "captioning", "target_set=vocab.json")
    (batch,) = list(EvalLoader(cfg, "t"))
    ids = [int(i) for i in batch.text_ids[batch.segment == Segment.CAUSAL]]
    # each caption ends with <end_of_text>; the one with a line break stays one caption
    decoded, current = [], []
    for i in ids:
        if i == tok.eot_id:
            decoded.append(tok.decode(current))
            current = []
        else:
            current.append(i)
    assert decoded == [" ".join(c.split()) for c in CAPTIONS]


def test_retrieval_trains_and_evaluates_on_img2dataset_shards(tmp_path: Path) -> None:
    write_img2dataset(tmp_path / "cc3m", CAPTIONS)
    cfg = _cfg(tmp_path / "cc3m", "retrieval", "micro_batch_size=2")
    eval_samples = sum(int(b.images.shape[0]) for b in EvalLoader(cfg, "t"))
    assert eval_samples == len(CAPTIONS)  # side files are not shards; every sample read once
    loader = MultiTaskLoader(cfg, 0, 1, 1)
    for _ in range(4):
        task, (batch,) = loader.next_step()
        assert task == "t" and batch.images.shape[:2] == (2, 1)
