"""OTB-format sequences: a reader for real benchmarks on disk and a synthetic generator.

OTB layout (what :func:`read_otb_sequence` reads and :func:`write_otb_sequence` writes)::

    Name/
      groundtruth_rect.txt   one "x,y,w,h" line per frame (commas, tabs or spaces)
      img/0001.jpg ...       frames in name order (``img/`` may be omitted: images next to the txt)

Synthetic sequences (:func:`synthetic_sequence`) are textured rectangles moving smoothly over a
textured background with scale change, appearance drift (the target's texture blends towards a
second one), a passing occluder and distractors whose texture is a perturbed copy of the target's,
so tracking, training and tests run without any download.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence as Seq, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
GT_NAME = "groundtruth_rect.txt"


class SequenceError(ValueError):
    """A sequence folder that cannot be used; the message names the folder and the problem."""


@dataclass
class Sequence:
    """One tracking sequence.

    Attributes:
        name: folder name.
        frames: ``N`` image paths in display order.
        boxes: ``(N, 4)`` float64 ground truth ``(x, y, w, h)``.
    """

    name: str
    frames: List[Path]
    boxes: np.ndarray

    def __len__(self) -> int:
        return len(self.frames)

    def image(self, i: int) -> np.ndarray:
        """Frame ``i`` as ``(H, W, 3) uint8`` RGB."""
        try:
            with Image.open(self.frames[i]) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise SequenceError(f"{self.name}: cannot read image {self.frames[i]} ({e}).") from None


def _parse_groundtruth(path: Path, name: str) -> np.ndarray:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = [p for p in re.split(r"[,\s]+", line.strip()) if p]
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            vals = []
        if len(vals) != 4:
            raise SequenceError(f"{name}: line {n} of {path} is not four numbers x,y,w,h: {line.strip()!r}.")
        rows.append(vals)
    if not rows:
        raise SequenceError(f"{name}: {path} has no boxes.")
    return np.asarray(rows, dtype=np.float64)


def read_otb_sequence(path: Union[str, Path], check_images: bool = True) -> Sequence:
    """Read an OTB-format sequence folder.

    Raises :class:`SequenceError` (one sentence) when the folder or its ground truth is missing,
    a ground-truth line is malformed, the number of images and boxes differ, or (with
    ``check_images``) an image file cannot be opened.
    """
    path = Path(path)
    name = path.name
    if not path.is_dir():
        raise SequenceError(f"{path} is not a directory.")
    gt = path / GT_NAME
    if not gt.is_file():
        raise SequenceError(f"{name}: missing ground truth {gt} (expected one 'x,y,w,h' line per frame).")
    img_dir = path / "img" if (path / "img").is_dir() else path
    frames = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not frames:
        raise SequenceError(f"{name}: no images ({', '.join(IMAGE_EXTS)}) in {img_dir}.")
    boxes = _parse_groundtruth(gt, name)
    if len(frames) != len(boxes):
        raise SequenceError(f"{name}: {len(frames)} images in {img_dir} but {len(boxes)} boxes in {gt}; "
                            "they must match one to one.")
    if check_images:
        for f in frames:
            try:
                with Image.open(f) as im:
                    im.size  # header parsed: format recognised
            except (OSError, UnidentifiedImageError) as e:
                raise SequenceError(f"{name}: cannot read image {f} ({e}).") from None
    return Sequence(name, frames, boxes)


def list_sequences(root: Union[str, Path]) -> List[Path]:
    """Sequence folders under ``root`` (its sub-directories, sorted), or ``[root]`` when ``root``
    itself holds a ground-truth file."""
    root = Path(root)
    if not root.is_dir():
        raise SequenceError(f"{root} is not a directory.")
    if (root / GT_NAME).is_file():
        return [root]
    seqs = sorted(p for p in root.iterdir() if p.is_dir())
    if not seqs:
        raise SequenceError(f"{root} contains no sequence folders.")
    return seqs


def write_otb_sequence(path: Union[str, Path], frames: Seq[np.ndarray], boxes: np.ndarray, ext: str = "png") -> Path:
    """Write ``frames [(H, W, 3) uint8]`` and ``boxes (N, 4)`` as an OTB folder; returns ``path``."""
    path = Path(path)
    (path / "img").mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames, 1):
        im = Image.fromarray(f)
        if ext in ("jpg", "jpeg"):
            im.save(path / "img" / f"{i:04d}.{ext}", quality=95)
        else:
            im.save(path / "img" / f"{i:04d}.{ext}")
    lines = [",".join(f"{v:g}" for v in b) for b in np.asarray(boxes)]
    (path / GT_NAME).write_text("\n".join(lines) + "\n")
    return path


# -- synthetic sequences ------------------------------------------------------------------------
@dataclass
class SynthConfig:
    """Synthetic sequence settings.

    Attributes:
        frames: number of frames.
        width / height: frame size in pixels.
        target_size: range of the target's initial longer side.
        scale_amplitude: the target's size oscillates within ``exp(+-scale_amplitude)``.
        speed: typical target speed in pixels per frame.
        drift: final blend weight of the target's texture towards a second texture.
        occlusion: pass an occluder over the target once per sequence.
        distractors: number of moving look-alike objects.
        noise: std of per-frame Gaussian pixel noise.
    """

    frames: int = 60
    width: int = 192
    height: int = 144
    target_size: Tuple[int, int] = (24, 40)
    scale_amplitude: float = 0.3
    speed: float = 2.5
    drift: float = 0.6
    occlusion: bool = True
    distractors: int = 2
    noise: float = 6.0

    def __post_init__(self):
        if self.frames < 2:
            raise ValueError(f"a sequence needs >= 2 frames, got {self.frames}.")
        if max(self.target_size) * 2 > min(self.width, self.height):
            raise ValueError(f"target_size {self.target_size} is too large for a {self.width}x{self.height} frame.")


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """``(h, w, 3)`` float32 in [0, 255]: random colours on a coarse grid, bicubic-upsampled."""
    g = (rng.random((cells, max(2, cells * w // max(h, 1)), 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(g).resize((w, h), Image.BICUBIC), dtype=np.float32)


def _background(rng, h, w) -> np.ndarray:
    return 0.6 * _smooth_noise(rng, h, w, 4) + 0.4 * _smooth_noise(rng, h, w, 16)


def _target_texture(rng, size: int = 64) -> np.ndarray:
    """A distinctive ``(size, size, 3)`` texture: oriented colour stripes over blobs."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta = rng.uniform(0, np.pi)
    freq = rng.uniform(2, 5)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)))
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    tex = stripes[..., None] * c1 + (1 - stripes[..., None]) * c2
    return (0.7 * tex + 0.3 * _smooth_noise(rng, size, size, 6)).astype(np.float32)


def _paste(frame: np.ndarray, tex: np.ndarray, x: int, y: int) -> None:
    """Paste ``tex (h, w, 3)`` with its top-left corner at ``(x, y)``, clipped to the frame."""
    h, w = tex.shape[:2]
    H, W = frame.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 > x0 and y1 > y0:
        frame[y0:y1, x0:x1] = tex[y0 - y:y1 - y, x0 - x:x1 - x]


def _resize(tex: np.ndarray, w: int, h: int) -> np.ndarray:
    im = Image.fromarray(np.clip(tex, 0, 255).astype(np.uint8))
    return np.asarray(im.resize((max(1, w), max(1, h)), Image.BILINEAR), dtype=np.float32)


class _Mover:
    """Smooth random walk that bounces off the frame borders (positions are box centres)."""

    def __init__(self, rng, W, H, margin, speed):
        self.rng, self.W, self.H, self.margin, self.speed = rng, W, H, margin, speed
        self.p = np.array([rng.uniform(margin, W - margin), rng.uniform(margin, H - margin)])
        ang = rng.uniform(0, 2 * np.pi)
        self.v = speed * np.array([np.cos(ang), np.sin(ang)])

    def step(self):
        self.v = 0.9 * self.v + self.rng.normal(0, 0.35 * self.speed, 2)
        n = np.linalg.norm(self.v)
        if n > 2 * self.speed:
            self.v *= 2 * self.speed / n
        self.p = self.p + self.v
        for k, lim in ((0, self.W), (1, self.H)):
            if self.p[k] < self.margin or self.p[k] > lim - self.margin:
                self.v[k] = -self.v[k]
                self.p[k] = np.clip(self.p[k], self.margin, lim - self.margin)
        return self.p


def synthetic_sequence(config: Optional[SynthConfig] = None, seed: int = 0) -> Tuple[List[np.ndarray], np.ndarray]:
    """Render one synthetic sequence.

    Returns:
        ``frames``: list of ``(H, W, 3) uint8`` RGB images; ``boxes``: ``(N, 4)`` float64
        integer-valued ``(x, y, w, h)`` of the target as drawn (including occluded frames).
    """
    c = config or SynthConfig()
    rng = np.random.default_rng(seed)
    H, W = c.height, c.width
    bg = _background(rng, H, W)
    tex_a, tex_b = _target_texture(rng), _target_texture(rng)
    side = rng.uniform(*c.target_size)
    aspect = np.exp(rng.uniform(-0.5, 0.5))  # h / w
    w0, h0 = side / np.sqrt(aspect), side * np.sqrt(aspect)
    if h0 > w0:
        w0, h0 = w0 * side / h0, side
    margin = side * np.exp(c.scale_amplitude) / 2 + 2
    target = _Mover(rng, W, H, margin, c.speed)
    phase, period = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.5) * c.frames
    distractors = []
    for _ in range(c.distractors):
        # Look-alikes: the target texture, colour-shifted and mixed with noise.
        tex = np.clip(tex_a[:, ::-1] * rng.uniform(0.7, 1.2, 3) + rng.normal(0, 20, 3), 0, 255)
        s = rng.uniform(0.7, 1.1)
        distractors.append((_Mover(rng, W, H, margin, c.speed), tex, s))
    occ_start = rng.integers(c.frames // 4, max(c.frames // 4 + 1, c.frames * 3 // 4))
    occ_len = max(4, c.frames // 6)
    occ_tex = _background(rng, int(h0 * 1.4) + 1, int(w0 * 0.8) + 1)
    frames, boxes = [], []
    for t in range(c.frames):
        frame = bg.copy()
        for mover, tex, s in distractors:
            p = mover.step() if t else mover.p
            dw, dh = int(round(w0 * s)), int(round(h0 * s))
            _paste(frame, _resize(tex, dw, dh), int(round(p[0] - dw / 2)), int(round(p[1] - dh / 2)))
        p = target.step() if t else target.p
        scale = np.exp(c.scale_amplitude * np.sin(2 * np.pi * t / period + phase))
        w, h = int(round(w0 * scale)), int(round(h0 * scale))
        x, y = int(round(p[0] - w / 2)), int(round(p[1] - h / 2))
        a = c.drift * t / (c.frames - 1)
        tex = (1 - a) * tex_a + a * tex_b
        _paste(frame, _resize(tex, w, h), x, y)
        if c.occlusion and occ_start <= t < occ_start + occ_len:
            # The occluder slides across the target from left to right.
            f = (t - occ_start + 0.5) / occ_len
            ox = x + w / 2 + (f - 0.5) * 2.5 * w - occ_tex.shape[1] / 2
            oy = y + h / 2 - occ_tex.shape[0] / 2
            _paste(frame, occ_tex, int(round(ox)), int(round(oy)))
        frame += rng.normal(0, c.noise, frame.shape)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
        boxes.append((x, y, w, h))
    return frames, np.asarray(boxes, dtype=np.float64)


def make_synthetic_benchmark(root: Union[str, Path], num_sequences: int, config: Optional[SynthConfig] = None,
                             seed: int = 1000, ext: str = "jpg") -> List[Path]:
    """Write ``num_sequences`` synthetic OTB folders ``root/synth_XXX``; returns their paths.

    Sequence ``i`` uses seed ``seed + i``, so a benchmark is reproducible from (config, seed).
    """
    root = Path(root)
    paths = []
    for i in range(num_sequences):
        frames, boxes = synthetic_sequence(config, seed + i)
        paths.append(write_otb_sequence(root / f"synth_{i:03d}", frames, boxes, ext=ext))
    (root / "synth_config.txt").write_text(f"{dataclasses.asdict(config or SynthConfig())} seed={seed}\n")
    return paths
