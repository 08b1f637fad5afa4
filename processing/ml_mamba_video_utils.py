"""Videos as frames for `MLMambaProcessor`: decoding (PyAV), frame sampling (``num_frames`` or ``fps``, evenly
spaced) and the timestamps of the sampled frames.

A video is a file path (or ``file://`` URL) decoded with PyAV (``pip install av``; only when a path is given), a
list of frames (PIL images, HWC arrays or CHW tensors), or one array / tensor of frames (T, H, W, C) or (T, C, H, W).
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def sample_indices(total: int, num_frames: int | None = None, fps: float | None = None,
                   source_fps: float | None = None, name: str = "video") -> list[int]:
    """Indices of the frames to keep out of ``total``: ``num_frames`` evenly spaced (the centre of each of
    ``num_frames`` equal segments), or one every ``1 / fps`` seconds (needs the video's own ``source_fps``), or all."""
    if total < 1:
        raise ValueError(f"{name} has no frames.")
    if num_frames is not None and fps is not None:
        raise ValueError(f"Pass num_frames or fps, not both (got num_frames={num_frames}, fps={fps}).")
    if num_frames is not None:
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}.")
        if num_frames > total:
            raise ValueError(f"num_frames={num_frames} but {name} has only {total} frames.")
        return [min(total - 1, int((i + 0.5) * total / num_frames)) for i in range(num_frames)]
    if fps is not None:
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps!r}.")
        if not source_fps:
            raise ValueError(f"fps={fps} needs the frame rate of {name}: pass video_fps= for frames given as arrays.")
        step = source_fps / fps
        return sorted({min(total - 1, int(i * step)) for i in range(max(1, math.floor(total / step)))})
    return list(range(total))


def _to_pil(frame, name: str) -> Image.Image:
    if isinstance(frame, Image.Image):
        return frame.convert("RGB")
    array = frame.detach().cpu().numpy() if hasattr(frame, "detach") else np.asarray(frame)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):  # CHW -> HWC
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"{name}: a frame must be a PIL image or an HWC / CHW array with 1 or 3 channels, got shape "
                         f"{tuple(array.shape)}.")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8) if array.max() <= 1.0 else \
            np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).convert("RGB")


def _decode(path: str, num_frames, fps, name: str) -> tuple[list[Image.Image], list[float]]:
    if not os.path.isfile(path):
        raise ValueError(f"{name}: no video file at {path!r}.")
    try:
        import av
    except ImportError as err:
        raise ImportError("Decoding a video file needs PyAV: pip install av (or ml-mamba[video]), or pass the "
                          "frames yourself.") from err
    try:
        with av.open(path) as container:  # first pass: the frames' times (cheap: no conversion)
            stream = container.streams.video[0]
            times = [float(frame.time or 0.0) for frame in container.decode(stream)]
            source_fps = float(stream.average_rate) if stream.average_rate else None
        keep = sample_indices(len(times), num_frames, fps, source_fps, name)
        wanted, frames = set(keep), []
        with av.open(path) as container:
            for index, frame in enumerate(container.decode(container.streams.video[0])):
                if index in wanted:
                    frames.append(frame.to_image().convert("RGB"))
                if index >= keep[-1]:
                    break
    except (av.error.FFmpegError, IndexError) as err:
        raise ValueError(f"{name}: could not decode the video {path!r}: {err}") from err
    return frames, [times[i] for i in keep]


def load_video(video, num_frames: int | None = None, fps: float | None = None, video_fps: float | None = None,
               name: str = "video") -> tuple[list[Image.Image], list[float]]:
    """``(frames, timestamps in seconds)`` of the sampled frames of ``video``. Frames given as arrays have no clock:
    ``video_fps`` gives it (timestamps ``index / video_fps``; default 1 frame per second)."""
    if isinstance(video, str):
        return _decode(video.removeprefix("file://"), num_frames, fps, name)
    if hasattr(video, "shape") and len(video.shape) == 4:  # one array / tensor of frames
        video = list(video)
    if not isinstance(video, (list, tuple)):
        raise ValueError(f"{name} must be a file path, a list of frames or a 4-D array of frames, got "
                         f"{type(video).__name__}.")
    keep = sample_indices(len(video), num_frames, fps, video_fps, name)
    frames = [_to_pil(video[i], f"{name} frame {i}") for i in keep]
    return frames, [i / (video_fps or 1.0) for i in keep]


__all__ = ["load_video", "sample_indices"]
