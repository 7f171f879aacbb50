"""Shard builders (tools/build_shards.py) on small trees, read back through the loaders."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_uni.config import Config, apply_overrides
from megatron_uni.batch import Segment
from megatron_uni.data.loader import EvalLoader
from megatron_uni.data.readers import iter_shard
from megatron_uni.data.text_tokenizer import get_tokenizer
from tools import build_shards

# Normalised red channel of a pure colour: (v / 255 - mean) / std.
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def save(path: Path, rgb: tuple[int, int, int], size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path)


def cfg_for(root: Path, *task: str) -> Config:
    return apply_overrides(Config(), [f"data.root={root}", *[f"data.tasks.t.{kv}" for kv in task],
                                      "data.tasks.t.crop_pct=1.0", "data.tasks.t.seq_len=64"])


def build(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert build_shards.main(argv) == 0
    return capsys.readouterr().out


def test_imagefolder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    colours = {"red_things": (250, 0, 0), "green_things": (0, 250, 0), "blue_things": (0, 0, 250)}
    for name, rgb in colours.items():
        for i in range(4):
            save(tmp_path / "in" / name / f"img.{i}.png", rgb)
    out = build(["imagefolder", str(tmp_path / "in"), "--out", str(tmp_path / "s"),
                 "--shard-size", "5"], capsys)
    assert "3 classes" in out and "wrote 12 samples in 3 shards" in out
    assert "train-{000000..000002}.tar" in out
    assert (tmp_path / "s" / "classes.txt").read_text() == "blue things\ngreen things\nred things\n"
    cfg = cfg_for(tmp_path / "s", "type=image_classification", "shards=train-*.tar",
                  "eval_shards=train-*.tar", "target_set=classes.txt", "micro_batch_size=12")
    (batch,) = list(EvalLoader(cfg, "t"))
    names = ["blue", "green", "red"]
    for image, label in zip(batch.images[:, 0], batch.loss.labels):
        rgb = image.mean((1, 2)).numpy() * STD + MEAN  # back to [0, 1]
        assert names[label] == ["red", "green", "blue"][int(np.argmax(rgb))]


def test_coco_captions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = [{"id": i, "file_name": f"{i:04d}.jpg"} for i in range(5)]
    annotations = [{"image_id": i, "caption": f"photo number {i} version {v}"}
                   for i in range(5) for v in range(2)]
    for i in range(4):  # image 4 is missing on disk
        save(tmp_path / "img" / f"{i:04d}.jpg", (20 * i, 0, 0))
    (tmp_path / "caps.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    out = build(["coco", str(tmp_path / "caps.json"), str(tmp_path / "img"), "--out",
                 str(tmp_path / "s"), "--no-shuffle"], capsys)
    assert "wrote 4 samples in 1 shard" in out and "skipped 1 unreadable" in out
    sample = next(iter_shard(str(tmp_path / "s" / "train-000000.tar")))
    assert sample.members["txt"] == b"photo number 0 version 0\nphoto number 0 version 1"
    tok = get_tokenizer()
    (tmp_path / "s" / "vocab.json").write_text(json.dumps(sorted(
        set(tok.encode(" ".join(a["caption"] for a in annotations))) | {tok.eot_id})))
    cfg = cfg_for(tmp_path / "s", "type=captioning", "eval_shards=train-000000.tar",
                  "target_set=vocab.json", "micro_batch_size=8")
    (batch,) = list(EvalLoader(cfg, "t"))
    captions = batch.text_ids[batch.segment == Segment.CAUSAL]
    text = tok.decode([int(i) for i in captions if i != tok.eot_id])
    assert text == " ".join(f"photo number {i} version 0" for i in range(4))  # first captions


def test_videos_as_frame_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for cls in ("brightening", "darkening"):
        for v in range(2):
            for t in range(6):
                value = 40 * t if cls == "brightening" else 200 - 40 * t
                save(tmp_path / "in" / cls / f"clip{v}" / f"frame_{t:03d}.jpg", (value,) * 3)
    captions = {"brightening/clip0": ["it gets brighter"], "clip1": "named by folder"}
    (tmp_path / "caps.json").write_text(json.dumps(captions))
    out = build(["videos", str(tmp_path / "in"), "--out", str(tmp_path / "s"), "--captions",
                 str(tmp_path / "caps.json")], capsys)
    assert "4 videos, 2 classes" in out and "captions for 3" in out
    sample = next(s for s in iter_shard(str(tmp_path / "s" / "train-000000.tar"))
                  if s.key == "brightening/clip0")
    assert sorted(sample.members) == ["0000.jpg", "0001.jpg", "0002.jpg", "0003.jpg", "0004.jpg",
                                      "0005.jpg", "cls", "txt"]
    cfg = cfg_for(tmp_path / "s", "type=video_classification", "eval_shards=train-000000.tar",
                  "target_set=classes.txt", "num_frames=4", "micro_batch_size=4")
    (batch,) = list(EvalLoader(cfg, "t"))
    assert batch.images.shape == (4, 4, 3, 32, 32)
    for clip, label in zip(batch.images, batch.loss.labels):
        brightness = clip.mean((1, 2, 3))
        steps = brightness[1:] - brightness[:-1]
        assert (steps > 0).all() if label == 0 else (steps < 0).all()  # frames in time order


def test_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.txt").write_text("the first line of text\n\nshort one\n")
    (tmp_path / "b.txt").write_text(" ".join(f"w{i}" for i in range(25)) + "\n")
    out = build(["text", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--out",
                 str(tmp_path / "s"), "--max-words", "10", "--no-shuffle"], capsys)
    assert "wrote 5 samples in 1 shard" in out  # 2 lines + 25 words in chunks of 10
    shard = str(tmp_path / "s" / "train-000000.tar")
    texts = [s.members["txt"].decode() for s in iter_shard(shard)]
    assert texts[:2] == ["the first line of text", "short one"] and len(texts[4].split()) == 5
    tok = get_tokenizer()
    vocab = sorted(set(tok.encode(" ".join(texts))))
    (tmp_path / "s" / "vocab.json").write_text(json.dumps(vocab))
    cfg = cfg_for(tmp_path / "s", "type=mlm", "eval_shards=train-000000.tar",
                  "target_set=vocab.json", "micro_batch_size=5")
    (batch,) = list(EvalLoader(cfg, "t"))
    ids = batch.text_ids.flatten().clone()
    ids[batch.loss.query_index] = torch.tensor([vocab[k] for k in batch.loss.labels])
    first = ids[batch.seq_id.flatten() == 0][1:].tolist()
    assert tok.decode(first) == "the first line of text"  # masks undone by their labels


def _write_video(path: Path, values: list[int], fps: int = 30, size: int = 48) -> None:
    """A uniformly grey video, frame t at brightness values[t] (PyAV, codec by suffix)."""
    import av
    from fractions import Fraction

    codec = {".webm": "libvpx-vp9", ".avi": "mpeg4"}.get(path.suffix, "libx264")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for v in values:
            pixels = np.full((size, size, 3), v, np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_videos_as_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("av")
    ramp = [min(20 + 2 * t, 235) for t in range(90)]  # 3 s at 30 fps
    files = {"brightening/a.mp4": ramp, "brightening/b.webm": ramp,
             "darkening/c.avi": ramp[::-1], "darkening/d.mkv": ramp[::-1]}
    for name, values in files.items():
        _write_video(tmp_path / "in" / name, values)
    (tmp_path / "caps.json").write_text(json.dumps({"a": "gets brighter"}))
    out = build(["videos", str(tmp_path / "in"), "--out", str(tmp_path / "s"), "--captions",
                 str(tmp_path / "caps.json"), "--short-side", "32"], capsys)
    assert "4 videos (4 video files), 2 classes" in out and "captions for 1" in out
    samples = {s.key: s for s in iter_shard(str(tmp_path / "s" / "train-000000.tar"))}
    assert sorted(samples) == ["brightening/a", "brightening/b", "darkening/c", "darkening/d"]
    a = samples["brightening/a"]
    # every 32nd frame of 90 at 30 fps: frames 0, 32, 64 (the reference's stride)
    assert sorted(a.members) == ["0000.jpg", "0001.jpg", "0002.jpg", "cls", "json", "txt"]
    meta = json.loads(a.members["json"])
    assert meta["frame_indices"] == [0, 32, 64] and meta["num_source_frames"] == 90
    assert Image.open(io.BytesIO(a.members["0000.jpg"])).size == (32, 32)
    cfg = cfg_for(tmp_path / "s", "type=video_classification", "eval_shards=train-000000.tar",
                  "target_set=classes.txt", "num_frames=3", "micro_batch_size=4")
    (batch,) = list(EvalLoader(cfg, "t"))
    assert batch.images.shape == (4, 3, 3, 32, 32)
    for clip, label in zip(batch.images, batch.loss.labels):
        steps = clip.mean((1, 2, 3)).diff()
        assert (steps > 0).all() if label == 0 else (steps < 0).all()  # frames in time order
