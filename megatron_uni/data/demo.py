"""The built-in demo dataset: rendered shapes, moving shapes, captions and sentences about them.

Generated locally from a seed (no download), byte-identical for the same seed and sizes.
Every image shows one shape with four attributes: shape (circle, square, triangle, diamond),
colour (red, green, blue, yellow), size (small, large) and position (four corners, centre), on
a plain dark background. A video is 8 frames of one shape moving left, right, up or down.

Layout under ``out`` (shard patterns as ``configs/tasks/demo.yaml`` reads them):

    images/{train,eval}-NNNNNN.tar  png, cls (colour x shape, 16 classes), txt (2 captions), json
    videos/{train,eval}-NNNNNN.tar  0000.png .. 0007.png, cls (direction, 4 classes), txt, json
    text/{train,eval}-NNNNNN.tar    txt (one or two sentences)
    image_classes.txt  video_classes.txt  vocab.json (BPE ids of every demo text + <eot>)
    demo.json          seed, sizes, shard summaries

Tasks it supports: image classification, video classification, MLM, image captioning,
image-text retrieval, and, held out from training, video-text retrieval: video captions
("a small red circle moving left") combine shape words learnt from images with motion words
learnt from video classification, so video-text retrieval can be evaluated zero-shot.

Why the held-out combination is learnable from the seen tasks (checked by
:func:`held_out_words_unseen`, tests/unit/data/test_demo.py): every word of a video caption
occurs in a seen task's text (size / colour / shape words in image captions and MLM sentences,
"moving left" in the video class names and in MLM sentences such as "the red circle is moving
left."), and videos are drawn by the same renderer as images (same shapes, colours, sizes,
backgrounds), so a video's first frame is an in-distribution image. What no seen task shows is
the pairing of a video clip with a caption in a retrieval: that is the zero-shot step.

Chance levels (:func:`chance_levels`, also written to ``demo.json``): classification top-1
1/16 (images) and 1/4 (videos); retrieval R@K = K/N over N eval pairs (N = 200 by default:
R@1 0.5 %, R@5 2.5 %, R@10 5 %). Video captions name 2 x 4 x 4 x 4 = 128 attribute
combinations, so among 200 eval clips a model that reads every attribute right still ties with
the other clips of the same combination (1.6 per combination on average).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from megatron_uni.data.shards import ShardSink, ShardSummary

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (225, 45, 45), "green": (45, 185, 70), "blue": (60, 100, 235),
           "yellow": (235, 215, 50)}
SIZES = {"small": 0.26, "large": 0.44}  # diameter as a fraction of the image side
POSITIONS = {"top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
             "bottom right": (0.73, 0.73), "center": (0.5, 0.5)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
IMAGE_CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
VIDEO_CLASSES = [f"moving {d}" for d in DIRECTIONS]
IMAGE_SIZE = 32
VIDEO_FRAMES = 8
SUPERSAMPLE = 4  # draw 4x larger, then downsample: smooth edges


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str = "center"
    direction: str = ""

    def where(self) -> str:
        return "in the center" if self.position == "center" else f"at the {self.position}"


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        r *= 0.85
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]  # diamond


def render(scene: Scene, centre: tuple[float, float], radius: float,
           background: tuple[int, int, int]) -> Image.Image:
    """One 32x32 RGB frame; ``centre`` and ``radius`` in fractions of the side."""
    side = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    cx, cy, r = centre[0] * side, centre[1] * side, radius * side
    colour = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, r), fill=colour)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _pick(rng: np.random.Generator, options) -> str:  # noqa: ANN001 - a dict or tuple
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 70, size=3))  # type: ignore[return-value]


def image_sample(rng: np.random.Generator) -> tuple[dict[str, bytes | str], Scene]:
    scene = Scene(_pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, SIZES), _pick(rng, POSITIONS))
    x, y = POSITIONS[scene.position]
    jitter = rng.uniform(-0.04, 0.04, size=2)
    radius = SIZES[scene.size] / 2 * rng.uniform(0.9, 1.1)
    image = render(scene, (x + jitter[0], y + jitter[1]), radius, _background(rng))
    captions = [
        f"a {scene.size} {scene.colour} {scene.shape} {scene.where()}",
        f"the {scene.colour} {scene.shape} is {scene.size} and sits {scene.where()}",
    ]
    label = IMAGE_CLASSES.index(f"{scene.colour} {scene.shape}")
    meta = {"shape": scene.shape, "colour": scene.colour, "size": scene.size,
            "position": scene.position, "label": label}
    return {"png": png(image), "cls": str(label), "txt": "\n".join(captions),
            "json": json.dumps(meta, sort_keys=True)}, scene


def video_sample(rng: np.random.Generator) -> tuple[dict[str, bytes | str], Scene]:
    scene = Scene(_pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, SIZES),
                  direction=_pick(rng, DIRECTIONS))
    radius = SIZES[scene.size] / 2 * rng.uniform(0.9, 1.1)
    travel = 0.42  # fraction of the side covered over the clip
    dx, dy = DIRECTIONS[scene.direction]
    low, high = radius + 0.02, 1 - radius - 0.02
    # Start so that the whole path stays inside the frame.
    start = [float(rng.uniform(low, high)) for _ in range(2)]
    for axis, d in ((0, dx), (1, dy)):
        if d > 0:
            start[axis] = float(rng.uniform(low, max(low, high - travel)))
        elif d < 0:
            start[axis] = float(rng.uniform(min(high, low + travel), high))
    background = _background(rng)
    members: dict[str, bytes | str] = {}
    for t in range(VIDEO_FRAMES):
        f = t / (VIDEO_FRAMES - 1)
        centre = (start[0] + dx * travel * f, start[1] + dy * travel * f)
        members[f"{t:04d}.png"] = png(render(scene, centre, radius, background))
    captions = [
        f"a {scene.size} {scene.colour} {scene.shape} moving {scene.direction}",
        f"the {scene.colour} {scene.shape} is {scene.size} and is moving {scene.direction}",
    ]
    label = VIDEO_CLASSES.index(f"moving {scene.direction}")
    members["cls"] = str(label)
    members["txt"] = "\n".join(captions)
    members["json"] = json.dumps({"shape": scene.shape, "colour": scene.colour,
                                  "size": scene.size, "direction": scene.direction,
                                  "label": label}, sort_keys=True)
    return members, scene


def sentence(rng: np.random.Generator) -> str:
    """One sentence of the demo language (the MLM corpus)."""
    a = Scene(_pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, SIZES), _pick(rng, POSITIONS),
              _pick(rng, DIRECTIONS))
    b = Scene(_pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, SIZES))
    templates = [
        f"a {a.size} {a.colour} {a.shape} is {a.where()}.",
        f"the {a.shape} is {a.colour} and it is {a.size}.",
        f"the {a.colour} {a.shape} is moving {a.direction}.",
        f"a {a.colour} {a.shape} moves {a.direction} while a {b.colour} {b.shape} stays still.",
        f"there is a {a.size} {a.shape} next to a {b.size} {b.colour} {b.shape}.",
        f"the {a.size} {a.shape} {a.where()} is {a.colour}, not {b.colour}.",
    ]
    return _pick(rng, templates)


def text_sample(rng: np.random.Generator) -> dict[str, bytes | str]:
    return {"txt": " ".join(sentence(rng) for _ in range(int(rng.integers(1, 3))))}


def chance_levels(num_eval: int) -> dict[str, float]:
    """Expected metrics of a model that guesses, for the demo's eval sets of ``num_eval``."""
    return {"image_cls_top1": 1 / len(IMAGE_CLASSES), "video_cls_top1": 1 / len(VIDEO_CLASSES),
            **{f"retrieval_r{k}": min(1.0, k / num_eval) for k in (1, 5, 10)}}


def held_out_words_unseen(num: int = 400, seed: int = 0) -> set[str]:
    """Words of held-out video captions that no seen task's text has (empty: the held-out
    captions are made of seen words). Seen texts: image captions, class names, MLM sentences."""
    rng = np.random.default_rng(seed)
    words = lambda text: set(text.replace(".", " ").replace(",", " ").split())  # noqa: E731
    seen = set().union(*(words(n) for n in IMAGE_CLASSES + VIDEO_CLASSES))
    held: set[str] = set()
    for _ in range(num):
        seen |= words(str(image_sample(rng)[0]["txt"])) | words(str(text_sample(rng)["txt"]))
        held |= words(str(video_sample(rng)[0]["txt"]))
    return held - seen


def _write(out: Path, prefix: str, count: int, num_shards: int,
           make: Callable[[np.random.Generator], dict[str, bytes | str]],
           rng: np.random.Generator, texts: list[str], progress: Callable[[int], None]
           ) -> ShardSummary:
    with ShardSink(out, prefix, max_count=max(1, -(-count // num_shards))) as sink:
        for i in range(count):
            members = make(rng)
            texts.append(str(members["txt"]))
            sink.write(f"{Path(prefix).name}{i:06d}", members)
            progress(1)
    return sink.summary


def make_demo_data(
    out: str | Path, *, seed: int = 0, num_train: int = 2000, num_eval: int = 200,
    num_train_shards: int = 8, progress: Callable[[int], None] | None = None,
) -> dict[str, ShardSummary]:
    """Write the demo dataset to ``out``: ``num_train`` images and texts and half as many
    videos for training, ``num_eval`` of each for evaluation. Returns the summaries by prefix."""
    from megatron_uni.data.text_tokenizer import get_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tick = progress or (lambda n: None)
    texts: list[str] = []
    summaries: dict[str, ShardSummary] = {}
    plan: list[tuple[str, int, Callable]] = [
        ("images", num_train, lambda r: image_sample(r)[0]),
        ("videos", max(1, num_train // 2), lambda r: video_sample(r)[0]),
        ("text", num_train, text_sample),
    ]
    for split_id, split in enumerate(("train", "eval")):
        for kind_id, (kind, train_count, make) in enumerate(plan):
            count = train_count if split == "train" else num_eval
            shards = num_train_shards if split == "train" else min(2, num_eval)
            rng = np.random.default_rng([seed, split_id, kind_id])
            summaries[f"{kind}/{split}"] = _write(
                out, f"{kind}/{split}", count, shards, make, rng, texts, tick)
    (out / "image_classes.txt").write_text("\n".join(IMAGE_CLASSES) + "\n")
    (out / "video_classes.txt").write_text("\n".join(VIDEO_CLASSES) + "\n")
    tokenizer = get_tokenizer()
    vocab = {tokenizer.eot_id}
    for text in texts + IMAGE_CLASSES + VIDEO_CLASSES:
        vocab.update(tokenizer.encode(text))
    (out / "vocab.json").write_text(json.dumps(sorted(vocab)) + "\n")
    (out / "demo.json").write_text(json.dumps({
        "seed": seed, "num_train": num_train, "num_eval": num_eval, "image_size": IMAGE_SIZE,
        "video_frames": VIDEO_FRAMES, "image_classes": IMAGE_CLASSES,
        "video_classes": VIDEO_CLASSES, "vocab_size": len(vocab),
        "chance": chance_levels(num_eval),
        "shards": {k: {"samples": s.samples, "shards": len(s.shards), "bytes": s.bytes,
                       "pattern": s.pattern} for k, s in summaries.items()},
    }, indent=2, sort_keys=True) + "\n")
    return summaries


def total_samples(num_train: int, num_eval: int) -> int:
    """Samples :func:`make_demo_data` writes (for progress bars)."""
    return 2 * num_train + max(1, num_train // 2) + 3 * num_eval

