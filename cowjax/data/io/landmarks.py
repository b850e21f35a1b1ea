"""Landmark files: 3D Slicer markups (``.mrk.json``, LPS unless it says otherwise), legacy Slicer
``.fcsv`` and plain ``.csv`` (name,x,y,z). Landmarks are ``[19, 3]`` float64 world RAS mm in
``anatomy.LANDMARKS`` order, a row of NaN where a landmark is not in the file (never guessed).
"""

from __future__ import annotations

import csv
import io as _io
import json
from pathlib import Path

import numpy as np

from cowjax import anatomy
from cowjax.errors import CowjaxError, atomic_output

SLICER_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                  "Resources/Schema/markups-schema-v1.0.3.json#")
# Legacy .fcsv headers write the coordinate system as a number (vtkMRMLStorageNode: 0 RAS, 1 LPS).
_FCSV_SYSTEMS = {"RAS": "RAS", "LPS": "LPS", "0": "RAS", "1": "LPS"}


def _system(path: Path, declared: str | None, argument: str | None) -> str:
    """The coordinate system of a landmark file: declared in the file or by the caller, agreeing."""
    declared = declared.strip().upper() if declared is not None else None
    argument = argument.strip().upper() if argument is not None else None
    for value in (declared, argument):
        if value is not None and value not in ("RAS", "LPS"):
            raise CowjaxError(f"{path}: unknown coordinate system {value!r} (expected LPS or RAS)")
    if declared and argument and declared != argument:
        raise CowjaxError(f"{path}: file declares {declared} but coordinate_system={argument} was given")
    system = declared or argument
    if system is None:
        raise CowjaxError(f"{path}: coordinate system not declared; state it in the file (LPS or RAS) "
                          f"or pass coordinate_system=")
    return system


def _collect(path: Path, entries, system: str) -> np.ndarray:
    """(label, xyz or None) pairs -> [19, 3] RAS, rejecting unknown, unlabelled or duplicate names."""
    out = np.full((anatomy.NUM_LANDMARKS, 3), np.nan)
    seen = set()
    for label, xyz in entries:
        label = (label or "").strip()
        if not label:
            raise CowjaxError(f"{path}: a landmark has no name (label)")
        if label not in anatomy.LANDMARK_INDEX:
            raise CowjaxError(f"{path}: unknown landmark name {label!r} (expected cow19 names, "
                              f"e.g. {anatomy.LANDMARKS[0]}, {anatomy.LANDMARKS[1]})")
        if label in seen:
            raise CowjaxError(f"{path}: duplicate landmark {label!r}")
        seen.add(label)
        if xyz is None:
            continue
        try:
            xyz = np.array([float(v) for v in xyz], dtype=np.float64)
        except (TypeError, ValueError):
            raise CowjaxError(f"{path}: landmark {label!r} has a non-numeric position {xyz!r}")
        if xyz.shape != (3,) or not np.all(np.isfinite(xyz)):
            raise CowjaxError(f"{path}: landmark {label!r} has an invalid position {xyz.tolist()}")
        out[anatomy.LANDMARK_INDEX[label]] = xyz
    if system == "LPS":
        out = out @ anatomy.LPS_TO_RAS.T
    return out


def _read_mrk_json(path: Path, text: str, coordinate_system: str | None) -> np.ndarray:
    try:
        doc = json.loads(text)
        markups = [m for m in doc["markups"] if m.get("type", "Fiducial") == "Fiducial"]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CowjaxError(f"{path}: not a Slicer markups JSON file ({e})")
    if len(markups) != 1:
        raise CowjaxError(f"{path}: expected one Fiducial markup, found {len(markups)}")
    markup = markups[0]
    units = markup.get("coordinateUnits", "mm")
    if units != "mm":
        raise CowjaxError(f"{path}: coordinateUnits {units!r} not supported (expected mm)")
    system = _system(path, markup.get("coordinateSystem"), coordinate_system)
    entries = []
    for p in markup.get("controlPoints", []):
        # Slicer keeps unplaced points with positionStatus "missing"/"undefined": unknown, not zero.
        placed = p.get("positionStatus", "defined") in ("defined", "preview")
        entries.append((p.get("label"), p.get("position") if placed else None))
    return _collect(path, entries, system)


def _read_fcsv(path: Path, text: str, coordinate_system: str | None) -> np.ndarray:
    declared, columns, rows = None, None, []
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            key = key.strip().lower()
            if key == "coordinatesystem":
                value = value.strip().upper()
                if value not in _FCSV_SYSTEMS:
                    raise CowjaxError(f"{path}: unknown CoordinateSystem {value!r}")
                declared = _FCSV_SYSTEMS[value]
            elif key == "columns":
                columns = [c.strip() for c in value.split(",")]
        elif line.strip():
            rows.append(line)
    columns = columns or ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock",
                          "label", "desc", "associatedNodeID"]
    system = _system(path, declared, coordinate_system)
    try:
        ix, iy, iz, il = (columns.index(c) for c in ("x", "y", "z", "label"))
    except ValueError:
        raise CowjaxError(f"{path}: .fcsv columns header lacks x, y, z or label: {columns}")
    entries = []
    for row in csv.reader(rows):
        if len(row) <= max(ix, iy, iz, il):
            raise CowjaxError(f"{path}: malformed row {','.join(row)!r}")
        entries.append((row[il], (row[ix], row[iy], row[iz])))
    return _collect(path, entries, system)


def _read_csv(path: Path, text: str, coordinate_system: str | None) -> np.ndarray:
    declared, lines = None, []
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            if key.strip().lower() == "coordinate_system":
                declared = value.strip()
        elif line.strip():
            lines.append(line)
    system = _system(path, declared, coordinate_system)
    reader = csv.DictReader(lines)
    if reader.fieldnames is None or not {"name", "x", "y", "z"} <= {f.strip() for f in
                                                                   reader.fieldnames}:
        raise CowjaxError(f"{path}: expected a header 'name,x,y,z', got {reader.fieldnames}")
    entries = []
    for row in reader:
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        # An empty position is how a known-missing landmark is written.
        xyz = None if not (row["x"] or row["y"] or row["z"]) else (row["x"], row["y"], row["z"])
        entries.append((row["name"], xyz))
    return _collect(path, entries, system)


def _landmark_format(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".mrk.json", ".fcsv", ".csv"):
        if name.endswith(suffix):
            return suffix
    raise CowjaxError(f"{path}: unknown landmark file type (expected .mrk.json, .fcsv or .csv)")


def read_landmarks(path: str | Path, coordinate_system: str | None = None) -> np.ndarray:
    """Read a landmark file -> [19, 3] float64 world RAS mm (NaN rows for landmarks not in it).

    ``.mrk.json`` (Slicer markups; ``coordinateSystem`` LPS or RAS), ``.fcsv`` (Slicer legacy;
    ``# CoordinateSystem = LPS|RAS|0|1``) or ``.csv`` (header ``name,x,y,z``; a
    ``# coordinate_system = RAS`` line). ``coordinate_system`` declares it for a file that does not;
    a file that declares a different one is an error, and so is a file with no declaration at all.
    """
    path = Path(path)
    kind = _landmark_format(path)
    if not path.is_file():
        raise CowjaxError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise CowjaxError(f"{path}: cannot read landmark file ({e})")
    reader = {".mrk.json": _read_mrk_json, ".fcsv": _read_fcsv, ".csv": _read_csv}[kind]
    return reader(path, text, coordinate_system)


# The per-point values write_landmarks can add, with the decimals each is written to.
_POINT_DIGITS = {"confidence": 4, "spread_mm": 2}


def _per_point(values: dict) -> dict[str, np.ndarray]:
    """{name: [19] floats} of the values given (None: left out)."""
    out = {}
    for name, v in values.items():
        if v is not None:
            v = np.asarray(v, dtype=np.float64)
            if v.shape != (anatomy.NUM_LANDMARKS,):
                raise ValueError(f"{name} shape {v.shape} != ({anatomy.NUM_LANDMARKS},)")
            out[name] = v
    return out


def write_landmarks(path: str | Path, landmarks_ras: np.ndarray, confidences=None,
                    spreads_mm=None) -> None:
    """Write [19, 3] RAS landmarks by suffix, atomically; NaN rows are not positions.

    ``.mrk.json`` is written in LPS as Slicer writes it, unknown points kept with positionStatus
    "missing"; ``.fcsv`` (LPS) and ``.csv`` (RAS, declared in a comment line) leave them out.
    Confidences and the passes' spreads, if given ([19] each), go in each point's description
    (``confidence=0.8123 spread_mm=0.42``; .mrk.json/.fcsv) or in columns (.csv).
    """
    path = Path(path)
    kind = _landmark_format(path)
    ras = np.asarray(landmarks_ras, dtype=np.float64)
    if ras.shape != (anatomy.NUM_LANDMARKS, 3):
        raise ValueError(f"landmarks shape {ras.shape} != ({anatomy.NUM_LANDMARKS}, 3)")
    extra = _per_point({"confidence": confidences, "spread_mm": spreads_mm})
    known = np.all(np.isfinite(ras), axis=1)
    lps = ras @ anatomy.LPS_TO_RAS.T

    def cells(i: int) -> list[str]:
        return [f"{v[i]:.{_POINT_DIGITS[name]}f}" for name, v in extra.items()]

    def desc(i: int) -> str:
        return " ".join(f"{name}={cell}" for name, cell in zip(extra, cells(i)))

    if kind == ".mrk.json":
        points = []
        for i, name in enumerate(anatomy.LANDMARKS):
            points.append({
                "id": str(i + 1), "label": name, "description": desc(i), "associatedNodeID": "",
                "position": lps[i].tolist() if known[i] else [0.0, 0.0, 0.0],
                "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                "selected": True, "locked": False, "visibility": True,
                "positionStatus": "defined" if known[i] else "missing"})
        doc = {"@schema": SLICER_SCHEMA, "markups": [{
            "type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm", "locked": False,
            "fixedNumberOfControlPoints": False, "labelFormat": "%N-%d",
            "lastUsedControlPointNumber": len(points), "controlPoints": points, "measurements": []}]}
        text = json.dumps(doc, indent=2)
    elif kind == ".fcsv":
        lines = ["# Markups fiducial file version = 4.11", "# CoordinateSystem = LPS",
                 "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"]
        for i, name in enumerate(anatomy.LANDMARKS):
            if known[i]:
                x, y, z = (repr(float(v)) for v in lps[i])
                lines.append(f"{i + 1},{x},{y},{z},0,0,0,1,1,1,0,{name},{desc(i)},")
        text = "\n".join(lines) + "\n"
    else:
        buf = _io.StringIO()
        buf.write("# coordinate_system = RAS\n")
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["name", "x", "y", "z", *extra])
        for i, name in enumerate(anatomy.LANDMARKS):
            if known[i]:
                writer.writerow([name] + [repr(float(v)) for v in ras[i]] + cells(i))
        text = buf.getvalue()
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
