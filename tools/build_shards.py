"""Build webdataset shards for the task families from common on-disk layouts.

    python -m tools.build_shards imagefolder ROOT --out DIR      # ROOT/<class>/<image>
    python -m tools.build_shards coco CAPTIONS.json IMAGES --out DIR
    python -m tools.build_shards videos ROOT --out DIR [--captions CAPTIONS.json]
                    # ROOT/[<class>/]<video>/<frame images> or ROOT/[<class>/]<video>.mp4
                    # (also .webm, .avi, .mkv, .mov: decoded with PyAV, every --frame-stride
                    # frames at 30 fps kept, short side --short-side, JPEG --jpeg-quality)
    python -m tools.build_shards text FILE [FILE ...] --out DIR

Common options: ``--prefix train`` (shards ``DIR/train-000000.tar``, ...), ``--shard-size``
(samples per shard), ``--max-bytes``, ``--seed`` (sample order is shuffled with it, so that
class-sorted folders do not give class-sorted shards; ``--no-shuffle`` keeps input order).
Each prints a progress bar and a summary (samples, shards, bytes, skipped) with the shard
pattern to put in a task's ``shards`` and, for labelled data, the class-name file for its
``target_set`` (``DIR/classes.txt``). Members written (what ``megatron_uni.data.examples``
reads): image ``jpg``/``png``/..., frames ``0000.jpg``, ..., ``cls``, ``txt``, ``json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tqdm import tqdm

from megatron_uni.data.shards import ShardSink, ShardSummary

logger = logging.getLogger("tools.build_shards")

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp"}

# A sample to write: key and a function giving its members (read lazily, in the write loop).
Item = tuple[str, Callable[[], dict[str, bytes | str]]]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_name(folder: str) -> str:
    return folder.replace("_", " ").replace("-", " ").strip()


def _write_classes(out: Path, classes: Sequence[str]) -> Path:
    path = out / "classes.txt"
    path.write_text("".join(_class_name(c) + "\n" for c in classes))
    return path


def imagefolder_items(root: Path, out: Path) -> tuple[list[Item], str]:
    """ROOT/<class>/<image>: image + cls (index into sorted class folders)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"{root}: no class folders (expected ROOT/<class>/<image>)")
    items: list[Item] = []
    for label, name in enumerate(classes):
        for path in _images(root / name):
            ext = IMAGE_SUFFIXES[path.suffix.lower()]
            items.append((f"{name}/{path.stem}",
                          lambda p=path, e=ext, y=label: {e: p.read_bytes(), "cls": str(y)}))
    classes_file = _write_classes(out, classes)
    return items, f"{len(classes)} classes -> target_set {classes_file}"


def coco_items(captions: Path, images: Path) -> tuple[list[Item], str]:
    """COCO captions JSON (``images``: id, file_name; ``annotations``: image_id, caption)."""
    data = json.loads(captions.read_text())
    by_image: dict[int, list[str]] = defaultdict(list)
    for ann in data.get("annotations", []):
        by_image[ann["image_id"]].append(" ".join(str(ann["caption"]).split()))
    items: list[Item] = []
    for image in sorted(data.get("images", []), key=lambda i: i["id"]):
        caps = by_image.get(image["id"])
        if not caps:
            continue
        path = images / image["file_name"]
        ext = IMAGE_SUFFIXES.get(path.suffix.lower(), "jpg")
        meta = json.dumps({"image_id": image["id"], "file_name": image["file_name"]})
        items.append((f"{image['id']:012d}" if isinstance(image["id"], int) else str(image["id"]),
                      lambda p=path, e=ext, c=caps, m=meta: {e: p.read_bytes(),
                                                             "txt": "\n".join(c), "json": m}))
    return items, f"{len(items)} captioned images of {len(data.get('images', []))}"


def video_items(root: Path, out: Path, captions: Path | None, *, stride: float = 32,
                short_side: int = 256, quality: int = 90) -> tuple[list[Item], str]:
    """Videos as frame folders (ROOT/[<class>/]<video>/<frames>) or video files
    (ROOT/[<class>/]<video>.mp4, .webm, .avi, .mkv, .mov; :mod:`tools.video_files` keeps every
    ``stride``-th frame at 30 fps, resized to ``short_side``, as JPEG). A ``json`` member
    records a file's fps, frame count and the kept frame indices."""
    from tools.video_files import VIDEO_SUFFIXES, frame_members  # noqa: PLC0415

    files = {p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES}
    folders = {p.parent for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
    videos = sorted(files | folders)
    if not videos:
        raise SystemExit(f"{root}: no frame folders or video files (expected "
                         f"ROOT/[<class>/]<video>/<frames> or ROOT/[<class>/]<video>.mp4)")
    depths = {len(v.relative_to(root).parts) for v in videos}
    if len(depths) != 1 or depths - {1, 2}:
        raise SystemExit(f"{root}: frame folders must all be ROOT/<video> or all "
                         f"ROOT/<class>/<video>, found depths {sorted(depths)}")
    labelled = depths == {2}
    classes = sorted({v.parent.name for v in videos}) if labelled else []
    texts: dict[str, list[str]] = {}
    if captions is not None:
        raw = json.loads(captions.read_text())
        texts = {k: [v] if isinstance(v, str) else list(v) for k, v in raw.items()}
    items: list[Item] = []
    def name_of(v: Path) -> str:
        return v.stem if v in files else v.name

    for video in videos:
        rel = video.relative_to(root).with_name(name_of(video)).as_posix()

        def members(v: Path = video, r: str = rel) -> dict[str, bytes | str]:
            out_members: dict[str, bytes | str] = {}
            if v in files:
                try:
                    frames, meta = frame_members(v, stride=stride, short_side=short_side,
                                                 quality=quality)
                except Exception as err:  # noqa: BLE001 - PyAV raises its own error classes
                    raise OSError(f"cannot decode {v}: {type(err).__name__}: {err}") from None
                out_members.update(frames)
                out_members["json"] = json.dumps({"source": r, **meta})
            for t, frame in enumerate(_images(v) if v in folders else []):
                out_members[f"{t:04d}.{IMAGE_SUFFIXES[frame.suffix.lower()]}"] = frame.read_bytes()
            if labelled:
                out_members["cls"] = str(classes.index(v.parent.name))
            caps = texts.get(r) or texts.get(name_of(v))
            if caps:
                out_members["txt"] = "\n".join(caps)
            return out_members

        items.append((rel, members))
    note = f"{len(videos)} videos" + (f" ({len(files)} video files)" if files else "")
    if labelled:
        note += f", {len(classes)} classes -> target_set {_write_classes(out, classes)}"
    if captions is not None:
        found = sum(1 for v in videos if texts.get(v.relative_to(root).with_name(
            name_of(v)).as_posix()) or texts.get(name_of(v)))
        note += f", captions for {found}"
    return items, note


def text_items(files: Sequence[Path], max_words: int) -> tuple[list[Item], str]:
    """Each non-empty line is a sample; lines longer than ``max_words`` words are split."""
    items: list[Item] = []
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f):
                words = line.split()
                for k in range(0, len(words), max_words):
                    chunk = " ".join(words[k : k + max_words])
                    items.append((f"{file.stem}/{n:09d}_{k // max_words:03d}",
                                  lambda c=chunk: {"txt": c}))
    return items, f"{len(files)} files"


def write_items(items: Iterable[Item], total: int, out: Path, prefix: str, shard_size: int,
                max_bytes: float) -> tuple[ShardSummary, int]:
    """Write ``items`` with a progress bar; unreadable inputs are skipped with a warning."""
    skipped = 0
    with ShardSink(out, prefix, max_count=shard_size, max_bytes=max_bytes) as sink:
        for key, members in tqdm(items, total=total, unit="sample", desc=prefix):
            try:
                data = members()
            except OSError as err:
                skipped += 1
                logger.warning("skipped %s: %s", key, err)
                continue
            sink.write(key, data)
    return sink.summary, skipped


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, type=Path, help="output directory")
    common.add_argument("--prefix", default="train", help="shard name prefix")
    common.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    common.add_argument("--max-bytes", type=float, default=1e9, help="bytes per shard, about")
    common.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    common.add_argument("--no-shuffle", action="store_true", help="keep the input order")
    p = sub.add_parser("imagefolder", parents=[common], help="ROOT/<class>/<image>")
    p.add_argument("root", type=Path)
    p = sub.add_parser("coco", parents=[common], help="COCO captions JSON + image folder")
    p.add_argument("captions", type=Path)
    p.add_argument("images", type=Path)
    p = sub.add_parser("videos", parents=[common],
                       help="ROOT/[<class>/]<video>/<frames> or ROOT/[<class>/]<video>.mp4")
    p.add_argument("root", type=Path)
    p.add_argument("--captions", type=Path, help="JSON: video name -> caption or captions")
    p.add_argument("--frame-stride", type=float, default=32.0,
                   help="video files: keep every N-th frame at 30 fps (the reference's STRIDE)")
    p.add_argument("--short-side", type=int, default=256,
                   help="video files: resize frames to this short side (0 = as stored)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="video files: JPEG quality")
    p = sub.add_parser("text", parents=[common], help="plain text files, a sample per line")
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--max-words", type=int, default=200, help="split longer lines")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    if args.source == "imagefolder":
        items, note = imagefolder_items(args.root, args.out)
    elif args.source == "coco":
        items, note = coco_items(args.captions, args.images)
    elif args.source == "videos":
        items, note = video_items(args.root, args.out, args.captions, stride=args.frame_stride,
                                  short_side=args.short_side, quality=args.jpeg_quality)
    else:
        items, note = text_items(args.files, args.max_words)
    if not items:
        raise SystemExit(f"no samples found ({note})")
    if not args.no_shuffle:
        random.Random(args.seed).shuffle(items)
    summary, skipped = write_items(items, len(items), args.out, args.prefix, args.shard_size,
                                   args.max_bytes)
    print(f"{args.source}: {note}")
    print(f"wrote {summary} under {args.out}" + (f"; skipped {skipped} unreadable" if skipped
                                                  else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
