"""Video files as frames, through PyAV (the optional `casa-hf[video]` extra)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import PIL.Image


def read_video_frames(
    path: str | os.PathLike, fps: float | None = None, max_frames: int | None = None
) -> Iterator[PIL.Image.Image]:
    """Decode `path` and yield RGB frames, sampled at `fps` frames per second of video time (all frames if None)."""
    try:
        import av
    except ImportError as error:
        raise ImportError("Reading video files needs PyAV: pip install 'casa-hf[video]'") from error
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Video file not found: {path}")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise ValueError(f"Cannot read video file {path}: {error}") from error
    with container:
        if not container.streams.video:
            raise ValueError(f"Cannot read video file {path}: it has no video stream")
        next_time, count = 0.0, 0
        try:
            for frame in container.decode(video=0):
                if fps is not None:
                    if frame.time is not None and frame.time + 1e-9 < next_time:
                        continue
                    next_time += 1.0 / fps
                yield frame.to_image()
                count += 1
                if max_frames is not None and count >= max_frames:
                    return
        except av.error.FFmpegError as error:
            raise ValueError(f"Cannot read video file {path}: {error}") from error


__all__ = ["read_video_frames"]
