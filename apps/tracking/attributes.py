"""Per-attribute results: success / precision over the sequences that share an attribute.

OTB tags every sequence with some of 11 attributes (:data:`OTB_ATTRIBUTES`: IV illumination
variation, SV scale variation, OCC occlusion, ...), and papers report a tracker's scores on each
subset (e.g. "OCC, 49 sequences"). ``hybridops-track evaluate`` and ``rescore`` do the same when
they find attribute files: next to the overall table, ``table.md`` gets a success-AUC and a
precision table with one row per attribute (named with its sequence count, best tracker in bold),
``results.json`` a ``by_attribute`` entry per tracker (scores and curves, also normalised
precision) and a top-level ``attributes`` list of each attribute's sequences, and
``attributes/<ATTR>_success_plot.png`` / ``<ATTR>_precision_plot.png`` are drawn per attribute
(each tracker keeps its colour across all plots). A sequence counts in every attribute it has;
sequences without attributes count only in the overall results. Where the attributes come from:

* ``--attrs FILE``: pysot's data set JSON (``OTB100.json``: ``{"Basketball": {"attr": ["IV",
  "OCC", ...], ...}, ...}``; any data set's JSON with ``attr`` lists works, LaSOT's and UAV123's
  tags included) or a list in the Python OTB toolkit's ``attr_list.txt`` form (one
  ``Name<TAB>IV, OCC, DEF`` line per sequence); only this file is used then;
* otherwise, per sequence, ``<sequence folder>/attrs.txt`` (one line of comma-separated tags,
  ``SV, DEF, FM, OPR, BC``, as that toolkit keeps them; 11 0/1 flags in OTB's order are read too),
  and for the sequences without one a pysot JSON (``<root name>.json`` first, then any ``*.json``
  with ``attr`` lists) or an ``attr_list.txt`` / ``attrlist.txt`` in the data root.

Names are matched exactly, then ignoring case, then without a multi-target suffix (``Jogging-1``
takes ``Jogging``'s tags). Tags are upper-cased; stray spaces and trailing commas (``IV ,SV``,
``SV, OCC, DEF,`` in OTB's own list) are ignored. An unreadable file given with ``--attrs`` or a
malformed ``attrs.txt`` ends in one ``error:`` line; discovered files that are not attribute
files are passed over.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence as Seq, Union

import numpy as np

from .data import Sequence, SequenceError

# OTB-2013/2015's attributes in the benchmark's own order (Wu, Lim, Yang, TPAMI 2015, Table 1).
OTB_ATTRIBUTES = {
    "IV": "illumination variation",
    "SV": "scale variation",
    "OCC": "occlusion",
    "DEF": "deformation",
    "MB": "motion blur",
    "FM": "fast motion",
    "IPR": "in-plane rotation",
    "OPR": "out-of-plane rotation",
    "OV": "out of view",
    "BC": "background clutters",
    "LR": "low resolution",
}

SEQUENCE_FILE = "attrs.txt"
LIST_FILES = ("attr_list.txt", "attrlist.txt")
_TAG = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


class AttributeFileError(SequenceError):
    """An attribute file that cannot be read; the message names the file and the problem."""


def describe(code: str) -> str:
    """``"IV"`` -> ``"illumination variation"``; other data sets' tags stay as they are."""
    return OTB_ATTRIBUTES.get(code, "")


def parse_tags(text: str, where: str) -> List[str]:
    """Tags of one sequence from ``"SV, DEF, FM"`` (commas, semicolons or spaces) or from 11 0/1
    flags in OTB's order (:data:`OTB_ATTRIBUTES`); upper-cased, in the order given, no repeats."""
    parts = [p for p in re.split(r"[,;\s]+", text.strip()) if p]
    if parts and all(p in ("0", "1") for p in parts):
        if len(parts) != len(OTB_ATTRIBUTES):
            raise AttributeFileError(f"{where}: {len(parts)} 0/1 flags; flags must be OTB's {len(OTB_ATTRIBUTES)} "
                                     f"({' '.join(OTB_ATTRIBUTES)}), otherwise write the tags by name.")
        return [c for c, p in zip(OTB_ATTRIBUTES, parts) if p == "1"]
    bad = [p for p in parts if not _TAG.fullmatch(p)]
    if bad:
        raise AttributeFileError(f"{where}: {bad[0]!r} is not an attribute tag (expected names such as "
                                 f"'IV, SV, OCC').")
    return list(dict.fromkeys(p.upper() for p in parts))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise AttributeFileError(f"{path} is not UTF-8 text.") from None
    except OSError as e:
        raise AttributeFileError(f"cannot read {path} ({e.strerror or e}).") from None


def _from_pysot_json(obj, path: Path) -> Dict[str, List[str]]:
    """``{video: tags}`` of a pysot data set JSON; :class:`AttributeFileError` when it has none."""
    if not isinstance(obj, dict):
        raise AttributeFileError(f"{path} is not a pysot data set JSON (an object of videos with 'attr' lists).")
    out = {}
    for name, video in obj.items():
        if not isinstance(video, dict) or "attr" not in video:
            continue
        attr = video["attr"]
        if isinstance(attr, str):
            out[str(name)] = parse_tags(attr, f"{path}, video {name}")
        elif isinstance(attr, list) and all(isinstance(a, str) for a in attr):
            out[str(name)] = parse_tags(",".join(attr), f"{path}, video {name}")
        elif isinstance(attr, list) and all(isinstance(a, (int, float)) for a in attr):
            out[str(name)] = parse_tags(",".join(str(int(a)) for a in attr), f"{path}, video {name}")
        else:
            raise AttributeFileError(f"{path}: video {name}'s 'attr' is not a list of tags.")
    if not out:
        raise AttributeFileError(f"{path} has no 'attr' lists (pysot data set JSON: "
                                 "{\"Basketball\": {\"attr\": [\"IV\", ...], ...}, ...}).")
    return out


def _from_list(text: str, path: Path) -> Dict[str, List[str]]:
    """``{sequence: tags}`` of an ``attr_list.txt`` (``Name<TAB>IV, SV`` or ``Name: IV, SV``)."""
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.fullmatch(r"\s*([^\s:,]+)\s*:?\s*(.*)", line)
        if not m:
            raise AttributeFileError(f"{path}: line {n} is not 'Name<TAB>IV, SV, ...': {line[:60]!r}.")
        out[m.group(1)] = parse_tags(m.group(2), f"{path}, line {n}")
    if not out:
        raise AttributeFileError(f"{path} names no sequences.")
    return out


def read_attribute_file(path: Union[str, Path]) -> Dict[str, List[str]]:
    """``{sequence: [tag, ...]}`` from a pysot data set JSON (``*.json``) or an
    ``attr_list.txt``-style list; :class:`AttributeFileError` (one line) when it is neither."""
    path = Path(path)
    if not path.is_file():
        raise AttributeFileError(f"attribute file {path} does not exist.")
    text = _read_text(path)
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise AttributeFileError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}).") from None
        return _from_pysot_json(obj, path)
    return _from_list(text, path)


def sequence_folder(seq: Sequence) -> Optional[Path]:
    """The folder of a sequence read from disk (the parent of ``img/`` / ``color/`` where the
    frames are in one), ``None`` for a sequence without frames."""
    if not seq.frames:
        return None
    d = Path(seq.frames[0]).parent
    return d.parent if d.name in ("img", "color") else d


def _root_files(root: Path) -> List[Path]:
    """Candidate data-set-level attribute files of ``root``: ``<root>.json`` first, then the other
    JSON files, then an ``attr_list.txt``."""
    if not root.is_dir():
        return []
    jsons = sorted(root.glob("*.json"), key=lambda p: (p.stem not in (root.name, root.name + "_new"), p.name))
    return jsons + [root / n for n in LIST_FILES if (root / n).is_file()]


def _lookup(table: Dict[str, List[str]], name: str) -> Optional[List[str]]:
    if name in table:
        return table[name]
    folded = {k.lower(): v for k, v in table.items()}
    if name.lower() in folded:
        return folded[name.lower()]
    base = re.sub(r"-\d+$", "", name)  # Jogging-1 -> Jogging (multi-target folder)
    return folded.get(base.lower()) if base != name else None


def load_attributes(seqs: Seq[Sequence], root: Optional[Union[str, Path]] = None,
                    attrs_file: Optional[Union[str, Path]] = None,
                    sources: Optional[List[str]] = None) -> Dict[str, List[str]]:
    """``{sequence name: [tag, ...]}`` for the sequences of ``seqs`` that have attributes.

    ``attrs_file`` (``--attrs``): only that file; it must name at least one of ``seqs``.
    Otherwise each sequence's ``attrs.txt``, then attribute files found in the data ``root``
    (see the module docstring). The files used are appended to ``sources``.
    """
    tags: Dict[str, List[str]] = {}
    used: List[str] = []
    if attrs_file is not None:
        table = read_attribute_file(attrs_file)
        for s in seqs:
            t = _lookup(table, s.name)
            if t is not None:
                tags[s.name] = t
        if not tags:
            some = ", ".join(list(table)[:3])
            raise AttributeFileError(f"{attrs_file} names none of the {len(seqs)} sequences "
                                     f"({', '.join(s.name for s in seqs[:3])}{', ...' if len(seqs) > 3 else ''}); "
                                     f"it has {some}{', ...' if len(table) > 3 else ''}.")
        used.append(str(attrs_file))
    else:
        per_seq = 0
        for s in seqs:
            d = sequence_folder(s)
            f = d / SEQUENCE_FILE if d is not None else None
            if f is not None and f.is_file():
                tags[s.name] = parse_tags(_read_text(f), str(f))
                per_seq += 1
        if per_seq:
            used.append(f"{per_seq} {SEQUENCE_FILE} file{'s' if per_seq > 1 else ''}")
        missing = [s for s in seqs if s.name not in tags]
        for f in (_root_files(Path(root)) if root is not None and missing else []):
            try:
                table = read_attribute_file(f)
            except AttributeFileError:
                continue  # results.json, a config: not an attribute file
            found = 0
            for s in missing:
                t = _lookup(table, s.name)
                if t is not None and s.name not in tags:
                    tags[s.name] = t
                    found += 1
            if found:
                used.append(str(f))
            missing = [s for s in missing if s.name not in tags]
            if not missing:
                break
    if sources is not None:
        sources.extend(used)
    return {s.name: tags[s.name] for s in seqs if s.name in tags}


def attribute_groups(tags: Dict[str, List[str]], names: Optional[Iterable[str]] = None) -> Dict[str, List[str]]:
    """``{attribute: [sequence, ...]}`` from ``{sequence: tags}`` (restricted to ``names`` when
    given, in that order): OTB's attributes in OTB's order first, then the others sorted; an
    attribute no sequence has is left out."""
    order = list(names) if names is not None else list(tags)
    groups: Dict[str, List[str]] = {}
    for name in order:
        for t in tags.get(name, ()):
            groups.setdefault(t, []).append(name)
    known = [c for c in OTB_ATTRIBUTES if c in groups]
    return {c: groups[c] for c in known + sorted(c for c in groups if c not in OTB_ATTRIBUTES)}


def score_groups(seq_curves: Dict[str, Dict[str, np.ndarray]], groups: Dict[str, List[str]]) -> Dict[str, Dict]:
    """Per-attribute scores from per-sequence curves (OTB averaging: each sequence of the group
    counts once): ``{attribute: {"sequences": n, "precision", "success_auc", "norm_precision",
    "curves": {...}}}``; sequences of a group without curves are left out of it."""
    out = {}
    for code, names in groups.items():
        cs = [seq_curves[n] for n in names if n in seq_curves]
        if not cs:
            continue
        mean = {k: np.mean([c[k] for c in cs], axis=0) for k in cs[0]}
        out[code] = {"sequences": len(cs), "precision": float(mean["precision"][20]),
                     "success_auc": float(mean["success"].mean()),
                     "norm_precision": float(mean["norm_precision"][20]), "curves": mean}
    return out


def label(code: str, n: int) -> str:
    """Row / title name of an attribute: ``"IV illumination variation (38)"``."""
    d = describe(code)
    return f"{code}{' ' + d if d else ''} ({n})"
