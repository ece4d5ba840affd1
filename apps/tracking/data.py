"""OTB-format sequences: a reader for real benchmarks on disk and a synthetic generator.

OTB layout (what :func:`read_otb_sequence` reads and :func:`write_otb_sequence` writes)::

    Name/
      groundtruth_rect.txt   one "x,y,w,h" line per frame (commas, tabs or spaces; a UTF-8 BOM is
                             ignored); groundtruth_rect.1.txt, .2.txt ... for multi-target folders
      img/0001.jpg ...       frames in numeric order (``img/`` may be omitted: images next to the txt)

:func:`load_dataset` also reads GOT-10k, LaSOT, VOT (polygons become axis-aligned boxes) and
UAV123 (NaN rows: target absent); absent frames are kept in the sequence and left out of scoring.

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
FORMATS = ("otb", "got10k", "lasot", "vot", "uav123")

# OTB sequences whose tracked range is not "every image in img/" (OTB's sequence list: the
# toolkit's startFrame / endFrame), as (first, last) image number. Sources: the benchmark's own
# python toolkit (jwlim/tracker_benchmark, butil/seq_config.py: David 300-770, Football1 to 74,
# Freeman3 to 460, Freeman4 to 283), got-10k/toolkit (got10k/datasets/otb.py: the same plus Diving
# to 215) and pytracking's OTB list (visionml/pytracking, pytracking/evaluation/otbdataset.py:
# BlurCar1 247-988, BlurCar3 3-359, BlurCar4 18-397, Tiger1 tracked from image 6 with the first 5
# ground-truth rows dropped, "initOmit"; no other sequence there starts after image 1 or omits rows).
# The BlurCars' first image files are 0247/0003/0018 themselves, so their range cuts nothing.
OTB_FRAME_RANGES = {
    "BlurCar1": (247, 988), "BlurCar3": (3, 359), "BlurCar4": (18, 397), "David": (300, 770),
    "Diving": (1, 215), "Football1": (1, 74), "Freeman3": (1, 460), "Freeman4": (1, 283), "Tiger1": (6, 354),
}


class SequenceError(ValueError):
    """A sequence folder that cannot be used; the message names the folder and the problem."""


@dataclass
class Sequence:
    """One tracking sequence.

    Attributes:
        name: sequence name (folder name; ``Name-k`` for target ``k`` of a multi-target OTB folder).
        frames: ``N`` image paths in display order.
        boxes: ``(N, 4)`` float64 ground truth ``(x, y, w, h)``; rows of NaN where the data set
            marks the target absent (UAV123) or gives no box.
        absent: ``(N,)`` bool, frames where the target is not visible (NaN rows, GOT-10k's
            ``absence.label``, LaSOT's full occlusion / out of view); they are not scored.
    """

    name: str
    frames: List[Path]
    boxes: np.ndarray
    absent: Optional[np.ndarray] = None

    def __post_init__(self):
        bad = ~np.isfinite(self.boxes).all(axis=1) | (np.nan_to_num(self.boxes[:, 2:]) <= 0).any(axis=1)
        self.absent = bad if self.absent is None else (np.asarray(self.absent, bool) | bad)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def valid(self) -> np.ndarray:
        """``(N,)`` bool: frames with a visible, usable ground-truth box (scored, trainable)."""
        return ~self.absent

    def image(self, i: int) -> np.ndarray:
        """Frame ``i`` as ``(H, W, 3) uint8`` RGB."""
        try:
            with Image.open(self.frames[i]) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise SequenceError(f"{self.name}: cannot read image {self.frames[i]} ({e}).") from None


def _read_text(path: Path, name: str) -> str:
    try:
        # utf-8-sig drops a byte-order mark (some OTB / UAV files have one), which would
        # otherwise make the first number unparsable.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise SequenceError(f"{name}: {path} is not UTF-8 text.") from None


def parse_boxes(path: Path, name: str) -> np.ndarray:
    """Ground-truth rows of any supported file: ``x,y,w,h`` (OTB, GOT-10k, LaSOT, UAV123 — with
    commas, tabs or spaces; ``NaN`` for an absent target) or VOT's 8-number polygons
    ``x1,y1,...,x4,y4``, turned into their axis-aligned bounding rectangle. ``(N, 4)`` float64."""
    rows = []
    for n, line in enumerate(_read_text(path, name).splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("m"):
            raise SequenceError(f"{name}: line {n} of {path} is a VOT segmentation mask; only boxes and polygons "
                                "are supported.")
        parts = [p for p in re.split(r"[,;\s]+", line) if p]
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            vals = []
        if len(vals) == 4:
            rows.append(vals)
        elif len(vals) == 8:
            xs, ys = np.asarray(vals[0::2]), np.asarray(vals[1::2])
            rows.append([xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()])
        else:
            raise SequenceError(f"{name}: line {n} of {path} is not four numbers x,y,w,h or an 8-number polygon: "
                                f"{line[:60]!r}.")
    if not rows:
        raise SequenceError(f"{name}: {path} has no boxes.")
    return np.asarray(rows, dtype=np.float64)


def _parse_groundtruth(path: Path, name: str) -> np.ndarray:
    return parse_boxes(path, name)


def _frame_number(p: Path) -> Optional[int]:
    m = re.search(r"(\d+)(?!.*\d)", p.stem)
    return int(m.group(1)) if m else None


def sorted_frames(img_dir: Path) -> List[Path]:
    """Image files of ``img_dir`` in frame order: by the last number in the name, so ``2.jpg``
    comes before ``10.jpg`` (text order would misalign boxes), then by name."""
    files = [p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file()]
    return sorted(files, key=lambda p: (_frame_number(p) is None, _frame_number(p) or 0, p.name))


def _check_images(name: str, frames: List[Path]) -> None:
    for f in frames:
        try:
            with Image.open(f) as im:
                im.size  # header parsed: format recognised
        except (OSError, UnidentifiedImageError) as e:
            raise SequenceError(f"{name}: cannot read image {f} ({e}).") from None


def _match(name: str, frames: List[Path], boxes: np.ndarray, img_dir: Path, gt: Path) -> None:
    if len(frames) != len(boxes):
        raise SequenceError(f"{name}: {len(frames)} images in {img_dir} but {len(boxes)} boxes in {gt}; "
                            "they must match one to one.")


def otb_groundtruth_files(path: Path) -> List[Tuple[Optional[int], Path]]:
    """``[(target, file)]``: ``[(None, groundtruth_rect.txt)]`` or, for multi-target folders
    (Jogging, Skating2, Human4), ``[(1, groundtruth_rect.1.txt), (2, ...)]``."""
    if (path / GT_NAME).is_file():
        return [(None, path / GT_NAME)]
    multi = []
    for p in path.glob("groundtruth_rect.*.txt"):
        m = re.fullmatch(r"groundtruth_rect\.(\d+)\.txt", p.name)
        if m:
            multi.append((int(m.group(1)), p))
    return sorted(multi)


def read_otb_sequence(path: Union[str, Path], check_images: bool = True, target: Optional[int] = None,
                      start_frame: Optional[int] = None, end_frame: Optional[int] = None) -> Sequence:
    """Read an OTB-format sequence folder (``img/`` + ``groundtruth_rect.txt``).

    ``target`` picks ``groundtruth_rect.<target>.txt`` in a multi-target folder (the sequence is
    then named ``Name-<target>``). Frames are ordered numerically. The sequence is the images
    numbered ``start_frame`` to ``end_frame``, by default OTB's range of that sequence
    (:data:`OTB_FRAME_RANGES`, e.g. David 300-770, Football1 1-74) or every image. The ground
    truth either covers just that range (David) or has one row per image from the first, and then
    the rows outside the range are dropped as the toolkit does (Tiger1). Given ``start_frame``
    alone, with fewer boxes than images, the boxes run from that image on.

    Raises :class:`SequenceError` (one sentence) when the folder or its ground truth is missing,
    a ground-truth line is malformed, the number of images and boxes cannot be matched, or (with
    ``check_images``) an image file cannot be opened.
    """
    path = Path(path)
    name = path.name
    if not path.is_dir():
        raise SequenceError(f"{path} is not a directory.")
    files = otb_groundtruth_files(path)
    if not files:
        raise SequenceError(f"{name}: missing ground truth {path / GT_NAME} (expected one 'x,y,w,h' line per frame).")
    if target is None and files[0][0] is not None:
        if len(files) > 1:
            raise SequenceError(f"{name}: has {len(files)} targets ({', '.join(f.name for _, f in files)}); "
                                "pick one with target=k (load_dataset reads them all).")
        target = files[0][0]
    gt = dict(files)[target] if target is not None and target in dict(files) else None
    if target is None:
        gt = files[0][1]
    elif gt is None:
        raise SequenceError(f"{name}: no groundtruth_rect.{target}.txt.")
    seq_name = name if target is None else f"{name}-{target}"
    img_dir = path / "img" if (path / "img").is_dir() else path
    frames = sorted_frames(img_dir)
    if not frames:
        raise SequenceError(f"{name}: no images ({', '.join(IMAGE_EXTS)}) in {img_dir}.")
    boxes = parse_boxes(gt, seq_name)
    start, end = OTB_FRAME_RANGES.get(name, (None, None))
    start = start_frame if start_frame is not None else start
    end = end_frame if end_frame is not None else end
    if start is not None or end is not None:
        frames, boxes = _otb_range(seq_name, frames, boxes, start, end, img_dir, gt)
    elif len(frames) > len(boxes):
        raise SequenceError(f"{seq_name}: {len(frames)} images in {img_dir} but {len(boxes)} boxes in {gt}, and the "
                            "first annotated frame is not known; pass start_frame (hybridops-track: --start-frame).")
    _match(seq_name, frames, boxes, img_dir, gt)
    if check_images:
        _check_images(seq_name, frames)
    return Sequence(seq_name, frames, boxes)


def _otb_range(name: str, frames: List[Path], boxes: np.ndarray, start: Optional[int], end: Optional[int],
               img_dir: Path, gt: Path) -> Tuple[List[Path], np.ndarray]:
    """``(frames, boxes)`` of the images numbered ``start..end`` (either may be None: open end);
    see :func:`read_otb_sequence` for how the ground-truth rows are matched to them."""
    nums = [_frame_number(f) for f in frames]
    if None in nums:  # unnumbered files: an image's number is its position
        nums = list(range(1, len(frames) + 1))
    # Images past the end frame are not part of the sequence (Football1: 81 images, 74 annotated).
    stop = sum(n <= end for n in nums) if end is not None else len(frames)
    i0 = sum(n < start for n in nums[:stop]) if start is not None else 0
    if len(boxes) == stop - i0:  # the file covers the range only (David: its first row is image 300)
        return frames[i0:stop], boxes
    if len(boxes) in (stop, len(frames)) and stop > i0 and (end is None or nums[stop - 1] == end):
        # One row per image from the first one (Tiger1): the toolkit drops the rows outside the
        # range. The last image kept must be the end frame, so a renumbered copy is refused, not misaligned.
        return frames[i0:stop], boxes[i0:stop]
    if end is None and len(boxes) < stop - i0:  # only the first annotated image is known
        return frames[i0:i0 + len(boxes)], boxes
    last = end if end is not None else "the last"
    raise SequenceError(f"{name}: {len(boxes)} boxes in {gt} fit neither the {stop - i0} images numbered "
                        f"{start if start is not None else 'the first'} to {last} in {img_dir} nor one per image "
                        f"from the first; pass start_frame (hybridops-track: --start-frame) if this copy's range differs "
                        f"from OTB's.")


def _flags(path: Path, n: int, name: str) -> Optional[np.ndarray]:
    """0/1 per frame from a GOT-10k / LaSOT label file (one per line, or comma-separated)."""
    if not path.is_file():
        return None
    vals = [v for v in re.split(r"[,\s]+", _read_text(path, name).strip()) if v]
    try:
        flags = np.asarray([int(float(v)) for v in vals], dtype=bool)
    except ValueError:
        raise SequenceError(f"{name}: {path} is not a list of 0/1 flags.") from None
    if len(flags) != n:
        raise SequenceError(f"{name}: {path} has {len(flags)} flags for {n} frames.")
    return flags


def read_got10k_sequence(path: Union[str, Path], check_images: bool = True) -> Sequence:
    """GOT-10k: ``Seq/00000001.jpg ...`` with ``groundtruth.txt`` (``x,y,w,h``) and optional
    ``absence.label`` (1 = target absent). The test split's one-box files can be tracked only
    with their first box, so they are refused with that reason."""
    path = Path(path)
    name = path.name
    gt = path / "groundtruth.txt"
    if not gt.is_file():
        raise SequenceError(f"{name}: missing ground truth {gt} (GOT-10k layout: images + groundtruth.txt).")
    frames = sorted_frames(path)
    boxes = parse_boxes(gt, name)
    if len(boxes) == 1 and len(frames) > 1:
        raise SequenceError(f"{name}: groundtruth.txt has only the first box (GOT-10k test split); it cannot be "
                            "scored locally.")
    _match(name, frames, boxes, path, gt)
    if check_images:
        _check_images(name, frames)
    return Sequence(name, frames, boxes, _flags(path / "absence.label", len(boxes), name))


def read_lasot_sequence(path: Union[str, Path], check_images: bool = True) -> Sequence:
    """LaSOT: ``cat-k/img/00000001.jpg ...``, ``groundtruth.txt`` (``x,y,w,h``) and
    ``full_occlusion.txt`` / ``out_of_view.txt`` (comma-separated 0/1; either marks the frame absent)."""
    path = Path(path)
    name = path.name
    gt = path / "groundtruth.txt"
    if not gt.is_file():
        raise SequenceError(f"{name}: missing ground truth {gt} (LaSOT layout: img/ + groundtruth.txt).")
    img_dir = path / "img" if (path / "img").is_dir() else path
    frames = sorted_frames(img_dir)
    boxes = parse_boxes(gt, name)
    _match(name, frames, boxes, img_dir, gt)
    if check_images:
        _check_images(name, frames)
    absent = np.zeros(len(boxes), bool)
    for f in ("full_occlusion.txt", "out_of_view.txt"):
        flags = _flags(path / f, len(boxes), name)
        if flags is not None:
            absent |= flags
    return Sequence(name, frames, boxes, absent)


def read_vot_sequence(path: Union[str, Path], check_images: bool = True) -> Sequence:
    """VOT: ``groundtruth.txt`` with one rectangle or 8-number polygon per line (polygons become
    their axis-aligned bounding box); images in ``color/`` (VOT2016+) or next to the file."""
    path = Path(path)
    name = path.name
    gt = path / "groundtruth.txt"
    if not gt.is_file():
        raise SequenceError(f"{name}: missing ground truth {gt} (VOT layout: groundtruth.txt + color/ or images).")
    img_dir = path / "color" if (path / "color").is_dir() else path
    frames = sorted_frames(img_dir)
    boxes = parse_boxes(gt, name)
    _match(name, frames, boxes, img_dir, gt)
    if check_images:
        _check_images(name, frames)
    return Sequence(name, frames, boxes)


def read_uav123_sequence(anno: Union[str, Path], root: Optional[Union[str, Path]] = None,
                         check_images: bool = True, start_frame: Optional[int] = None) -> Sequence:
    """UAV123: annotation ``anno/UAV123/<seq>.txt`` (``x,y,w,h``, ``NaN`` rows while the target is
    absent) and images ``data_seq/UAV123/<seq>/000001.jpg ...``. Sub-sequences that share a folder
    (``bird1_2`` in ``bird1/``) need ``start_frame``: their range is not in the files."""
    anno = Path(anno)
    name = anno.stem
    root = Path(root) if root is not None else anno.parent.parent.parent
    boxes = parse_boxes(anno, name)
    base = root / "data_seq" / "UAV123"
    img_dir = base / name
    if not img_dir.is_dir():
        parent = re.sub(r"_\d+$", "", name)
        if parent != name and (base / parent).is_dir() and start_frame is not None:
            img_dir = base / parent
        else:
            raise SequenceError(f"{name}: no image folder {img_dir}" + (
                f"; it is a part of {base / parent}, pass its start_frame (hybridops-track: --start-frame)"
                if parent != name else "") + ".")
    frames = sorted_frames(img_dir)
    if start_frame is not None:
        frames = [f for f in frames if (_frame_number(f) or 0) >= start_frame][:len(boxes)]
    _match(name, frames, boxes, img_dir, anno)
    if check_images:
        _check_images(name, frames)
    return Sequence(name, frames, boxes)


def list_sequences(root: Union[str, Path]) -> List[Path]:
    """Sequence folders under ``root`` (its sub-directories, sorted), or ``[root]`` when ``root``
    itself holds a ground-truth file."""
    root = Path(root)
    if not root.is_dir():
        raise SequenceError(f"{root} is not a directory.")
    if otb_groundtruth_files(root) or (root / "groundtruth.txt").is_file():
        return [root]
    seqs = sorted(p for p in root.iterdir() if p.is_dir())
    if not seqs:
        raise SequenceError(f"{root} contains no sequence folders.")
    return seqs


def _dataset_jobs(root: Path, fmt: str, check_images: bool, start_frame: Optional[int] = None):
    """``[(name, reader)]`` for every sequence of ``root`` in format ``fmt``."""
    from functools import partial
    if start_frame is not None and fmt not in ("otb", "uav123"):
        raise SequenceError(f"a start frame applies to OTB and UAV123 sequences (the others number every frame), not "
                            f"to {fmt}.")
    if fmt == "uav123":
        anno_dir = root / "anno" / "UAV123"
        if not anno_dir.is_dir():
            raise SequenceError(f"{root}: no anno/UAV123/ folder (UAV123 layout: anno/UAV123/*.txt + data_seq/UAV123/).")
        return [(a.stem, partial(read_uav123_sequence, a, root, check_images, start_frame))
                for a in sorted(anno_dir.glob("*.txt"))]
    readers = {"got10k": read_got10k_sequence, "lasot": read_lasot_sequence, "vot": read_vot_sequence}
    if fmt == "otb":
        jobs = []
        for p in list_sequences(root):
            files = otb_groundtruth_files(p)
            targets = [t for t, _ in files] if len(files) > 1 else [files[0][0] if files else None]
            jobs += [(p.name if t is None else f"{p.name}-{t}",
                      partial(read_otb_sequence, p, check_images, t, start_frame)) for t in targets]
        return jobs
    if fmt not in readers:
        raise SequenceError(f"unknown data set format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    if (root / "groundtruth.txt").is_file():
        folders = [root]
    else:
        listed = root / "list.txt"  # GOT-10k and VOT name their sequences in list.txt
        if listed.is_file():
            folders = [root / n.strip() for n in _read_text(listed, root.name).splitlines() if n.strip()]
        else:
            folders = sorted(p for p in root.iterdir() if p.is_dir())
            if fmt == "lasot" and folders and not any((p / "groundtruth.txt").is_file() for p in folders):
                # LaSOT groups sequences by category: root/airplane/airplane-1/...
                folders = sorted(q for p in folders for q in p.iterdir() if q.is_dir())
    if not folders:
        raise SequenceError(f"{root} contains no sequence folders.")
    return [(p.name, partial(readers[fmt], p, check_images)) for p in folders]


def _sequence_format(path: Path) -> Optional[str]:
    """The layout of one sequence folder, from the files only that layout has, or None."""
    if otb_groundtruth_files(path):
        return "otb"
    if not (path / "groundtruth.txt").is_file():
        return None
    if (path / "full_occlusion.txt").is_file() or (path / "out_of_view.txt").is_file():
        return "lasot"
    if (path / "absence.label").is_file() or (path / "cover.label").is_file() or (path / "meta_info.ini").is_file():
        return "got10k"
    if (path / "color").is_dir() or any(path.glob("*.tag")) or any(path.glob("*.label")):
        return "vot"
    return None


def detect_format(root: Union[str, Path]) -> str:
    """The layout of the data set (or sequence) folder ``root``, one of :data:`FORMATS`, from the
    files that identify it: UAV123's ``anno/UAV123/``; OTB's ``groundtruth_rect.txt``; LaSOT's
    ``full_occlusion.txt`` / ``out_of_view.txt`` (sequences grouped by category); GOT-10k's
    ``absence.label`` / ``cover.label`` / ``meta_info.ini``; VOT's ``color/`` folder or ``*.tag``
    files. ``groundtruth.txt`` files that say none of these raise :class:`SequenceError` naming
    ``--format``; a folder with no ground truth at all is taken for OTB, whose reader names what
    is missing."""
    root = Path(root)
    if not root.is_dir():
        raise SequenceError(f"{root} is not a directory.")
    if (root / "anno" / "UAV123").is_dir():
        return "uav123"
    found = _sequence_format(root)
    subs = sorted(p for p in root.iterdir() if p.is_dir())
    if found is None:
        for p in subs[:20]:  # a few sequences say it; a category folder of LaSOT one level down
            found = _sequence_format(p) or next(
                (f for q in sorted(p.iterdir())[:5] if q.is_dir() for f in [_sequence_format(q)] if f == "lasot"), None)
            if found is not None:
                break
    if found is None:
        if (root / "groundtruth.txt").is_file() or any((p / "groundtruth.txt").is_file() for p in subs[:20]):
            raise SequenceError(f"{root}: the data set layout is not recognisable from its files; pass --format "
                                f"({', '.join(FORMATS)}).")
        return "otb"  # nothing says otherwise: the OTB reader then names what is missing
    return found


def load_dataset(root: Union[str, Path], fmt: Optional[str] = None, skip_bad: bool = False, check_images: bool = True,
                 skipped: Optional[List[Tuple[str, str]]] = None,
                 start_frame: Optional[int] = None) -> List[Sequence]:
    """Every sequence of the data set at ``root`` (a data set folder or one sequence folder).

    ``fmt``: one of :data:`FORMATS`, or None to detect it from the folder (:func:`detect_format`).
    ``start_frame``: the number of the first annotated frame, for one OTB or UAV123 sequence whose
    range its files do not give (the reader says when). A sequence that cannot be read raises its
    one-line :class:`SequenceError`, or with ``skip_bad`` is left out and ``(name, reason)``
    appended to ``skipped``.
    """
    root = Path(root)
    if not root.is_dir():
        raise SequenceError(f"{root} is not a directory.")
    fmt = fmt or detect_format(root)
    jobs = _dataset_jobs(root, fmt, check_images, start_frame)
    if start_frame is not None and len(jobs) != 1:
        raise SequenceError(f"{root} holds {len(jobs)} sequences; a start frame applies to one sequence: point at its "
                            f"folder.")
    seqs = []
    for name, read in jobs:
        try:
            seqs.append(read())
        except SequenceError as e:
            if not skip_bad:
                raise
            if skipped is not None:
                skipped.append((name, str(e)))
    if not seqs:
        raise SequenceError(f"{root}: no readable {fmt} sequence" + (" (all were skipped)." if skip_bad else "."))
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
