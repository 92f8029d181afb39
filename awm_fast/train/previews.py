"""Video previews: a few frames side by side (one PNG per video, and the strips the image grids show) and an
animated GIF per video (PIL), for the evaluation and `awm-fast sample` of video models (model.kind=wan).

Frames shown: k evenly spaced indices round(j (F - 1) / (k - 1)), j = 0 .. k - 1 (the first and the last frame
included; every frame when F <= k). GIFs play at `fps` (16: Wan's frame rate) as closely as the format allows:
frame delays are whole centiseconds, round(100 / fps) (16 fps -> 60 ms).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from awm_fast.rewards.base import to_pil

STRIP_FRAMES = 4  # frames per video in strips and grids
PREVIEW_VIDEOS = 8  # videos per evaluation that get a GIF
FPS = 16  # Wan 2.1 / 2.2 generate 16 frames per second


def frame_indices(frames: int, k: int = STRIP_FRAMES) -> list[int]:
    """min(k, frames) evenly spaced frame indices of a video of `frames` frames, first and last included."""
    if frames < 1 or k < 1:
        raise ValueError(f"frame_indices: frames={frames} and k={k} must be >= 1")
    if frames <= k:
        return list(range(frames))
    if k == 1:
        return [0]
    return [round(j * (frames - 1) / (k - 1)) for j in range(k)]


def frame_strip(videos: torch.Tensor, k: int = STRIP_FRAMES) -> torch.Tensor:
    """Videos (N, F, C, H, W) -> images (N, C, H, k' W): the frame_indices(F, k) frames side by side."""
    if videos.ndim != 5:
        raise ValueError(f"frame_strip: expected videos (N, F, C, H, W), got shape {tuple(videos.shape)}")
    picked = videos[:, frame_indices(videos.shape[1], k)]  # (N, k', C, H, W)
    return picked.permute(0, 2, 3, 1, 4).flatten(3, 4)


def save_gif(video: torch.Tensor, path: Path, fps: int = FPS) -> None:
    """One video (F, C, H, W) in [0, 1] as an animated GIF that loops."""
    frames = to_pil(video)  # the frames (F, C, H, W) as N images
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=10 * max(1, round(100 / fps)), loop=0)


def write_previews(videos: torch.Tensor, folder: Path, prompts: list[str], *, first_index: int = 0,
                   max_videos: int = PREVIEW_VIDEOS, k: int = STRIP_FRAMES, fps: int = FPS) -> list[Path]:
    """For the videos of global index first_index + i < max_videos: NNNN.gif and NNNN_frames.png (k frames) in
    `folder`, listed with their prompt in folder/previews.json (merged over calls). Returns the GIF paths."""
    from awm_fast.train.report import save_grid

    folder = Path(folder)
    count = max(0, min(len(videos), max_videos - first_index))
    if not count:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    index_file = folder / "previews.json"
    listed = json.loads(index_file.read_text()) if index_file.is_file() else []
    written = []
    strips, picked = frame_strip(videos[:count], k), frame_indices(videos.shape[1], k)
    for i in range(count):
        name = f"{first_index + i:04d}"
        save_gif(videos[i], folder / f"{name}.gif", fps)
        save_grid(strips[i:i + 1], folder / f"{name}_frames.png", per_row=1, min_cell=1)
        listed = [e for e in listed if e["index"] != first_index + i]
        listed.append({"index": first_index + i, "prompt": prompts[i], "gif": f"{name}.gif",
                       "frames": f"{name}_frames.png", "frame_indices": picked})
        written.append(folder / f"{name}.gif")
    index_file.write_text(json.dumps(sorted(listed, key=lambda e: e["index"]), indent=2))
    return written
