"""Video files (mp4, webm, avi, mkv, ...) -> sampled frames, with PyAV (``pip install av``).

Used by ``python -m tools.build_shards videos`` at build time: a file is decoded once, every
``frame_step`` frames is kept (the reference's stride: 32 frames at 30 fps, so
``32 * fps / 30`` frames of the file's own rate), resized to a short side and stored as JPEG
members ``0000.jpg``, ``0001.jpg``, ... which the loader reads like any frame folder. Why frames
and not the encoded clip: measured by ``python -m tools.bench_video`` (README, "Video files").

torchvision 0.29's ``torchvision.io`` has no video reader any more (its video API was removed),
so PyAV, the library the reference itself decodes with, is the one dependency.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")
REFERENCE_STRIDE = 32  # frames between sampled frames at REFERENCE_FPS (its DATALOADER.STRIDE)
REFERENCE_FPS = 30.0


def _av():  # noqa: ANN202 - the av module
    try:
        import av  # noqa: PLC0415
    except ImportError as err:
        raise SystemExit("video files need PyAV: pip install av (pinned in requirements.txt)"
                         ) from err
    return av


def probe(source: str | Path | bytes) -> tuple[int, float]:
    """(frame count, frames per second) of a video file; the count is decoded when the
    container does not state it (``stream.frames == 0``, as for webm)."""
    av = _av()
    with av.open(_open_arg(source)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or REFERENCE_FPS)
        total = stream.frames
        if total <= 0:
            total = sum(1 for _ in container.decode(stream))
    return total, fps


def _open_arg(source: str | Path | bytes):  # noqa: ANN202 - what av.open takes
    return io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)


def stride_indices(total: int, fps: float, stride: float = REFERENCE_STRIDE,
                   target_fps: float = REFERENCE_FPS) -> list[int]:
    """Every ``stride * fps / target_fps``-th frame of ``total`` (at least one frame)."""
    step = max(stride * fps / target_fps, 1.0)
    count = max(1, math.ceil(total / step))
    return sorted({min(int(i * step), total - 1) for i in range(count)})


def decode_frames(source: str | Path | bytes, indices: Sequence[int], short_side: int = 0
                  ) -> list:  # list of PIL images
    """The frames at ``indices`` (0-based, decoding order) as RGB PIL images, resized so the
    short side is ``short_side`` (0 = as stored). Missing tail frames repeat the last decoded."""
    av = _av()
    wanted = set(indices)
    images: dict[int, object] = {}
    last = None
    with av.open(_open_arg(source)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for number, frame in enumerate(container.decode(stream)):
            if number in wanted:
                images[number] = last = frame.to_image()
                if len(images) == len(wanted):
                    break
    if last is None:
        raise ValueError("no frame decoded")
    out = [images.get(i, last) for i in indices]
    return [_resize_short(im, short_side) for im in out] if short_side else out


def _resize_short(image, short_side: int):  # noqa: ANN001, ANN202 - PIL images
    from PIL import Image  # noqa: PLC0415

    w, h = image.size
    if min(w, h) <= short_side:
        return image
    scale = short_side / min(w, h)
    return image.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)


def jpeg(image, quality: int = 90) -> bytes:  # noqa: ANN001 - a PIL image
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def frame_members(source: str | Path | bytes, *, stride: float = REFERENCE_STRIDE,
                  short_side: int = 256, quality: int = 90) -> tuple[dict[str, bytes], dict]:
    """A video file's webdataset members: ``0000.jpg``, ... (every stride-th frame, resized) and
    what the ``json`` member records about it (source fps, frame count, kept indices)."""
    total, fps = probe(source)
    indices = stride_indices(total, fps, stride)
    frames = decode_frames(source, indices, short_side)
    members = {f"{t:04d}.jpg": jpeg(im, quality) for t, im in enumerate(frames)}
    return members, {"fps": fps, "num_source_frames": total, "frame_indices": indices,
                     "stride": stride}


def write_test_video(path: str | Path, *, seconds: float = 2.0, fps: int = 30,
                     size: tuple[int, int] = (96, 64), codec: str | None = None,
                     seed: int = 0) -> Path:
    """A small synthetic video (a moving square over a gradient with a little noise) for tests
    and the benchmark; the codec follows the suffix (mp4/mkv/avi: h264/mpeg4, webm: vp9)."""
    import numpy as np  # noqa: PLC0415

    av = _av()
    path = Path(path)
    codec = codec or {".webm": "libvpx-vp9", ".avi": "mpeg4"}.get(path.suffix.lower(), "libx264")
    width, height = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                     np.full_like(xx, 96)], -1).astype(np.int16)
    side = max(min(width, height) // 4, 2)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(int(seconds * fps)):
            frame = base + rng.integers(-12, 13, base.shape)
            x = (t * 3) % max(width - side, 1)
            y = (t * 2) % max(height - side, 1)
            frame[y : y + side, x : x + side] = (255, 255, 255)
            image = av.VideoFrame.from_ndarray(frame.clip(0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
