"""The cow19 anatomy, defined once: 19 landmarks, 20 arterial segments, their graph and variation.

Every other module reads names, channel order, the mirror map and the attribute rule from here
(see ``shared/cow19.md``). Coordinates are world millimetres, RAS.

Shapes: landmark arrays are ``[..., NUM_LANDMARKS]`` in channel order; segment arrays are
``[..., NUM_SEGMENTS]`` with segment ``j`` being semantic class ``j + 1`` (class 0 is background).
"""

from __future__ import annotations

import numpy as np

_SIDE_LANDMARKS = ("ICA_prox", "ICA_PCoA", "ICA_term", "M1_M2", "M2_end", "A1_A2", "A2_end",
                   "P1_P2", "P2_end")
_SIDE_SEGMENTS = ("ICA_C6", "ICA_C7", "M1", "M2", "A1", "A2", "P1", "P2", "PCoA")

LANDMARKS: tuple[str, ...] = (("BA_top",) + tuple(f"{n}_R" for n in _SIDE_LANDMARKS)
                              + tuple(f"{n}_L" for n in _SIDE_LANDMARKS))
SEGMENTS: tuple[str, ...] = (("BA", "ACoA") + tuple(f"{n}_R" for n in _SIDE_SEGMENTS)
                             + tuple(f"{n}_L" for n in _SIDE_SEGMENTS))
NUM_LANDMARKS = len(LANDMARKS)          # 19
NUM_SEGMENTS = len(SEGMENTS)            # 20
NUM_CLASSES = NUM_SEGMENTS + 1          # background + segments
LANDMARK_INDEX = {n: i for i, n in enumerate(LANDMARKS)}
SEGMENT_INDEX = {n: i for i, n in enumerate(SEGMENTS)}

# Free end of the basilar artery; a template point but not a landmark.
VBJ = "VBJ"

# Segment -> (proximal end, distal end), landmark names (or VBJ).
_SIDE_ENDS = {
    "ICA_C6": ("ICA_prox", "ICA_PCoA"),
    "ICA_C7": ("ICA_PCoA", "ICA_term"),
    "M1": ("ICA_term", "M1_M2"),
    "M2": ("M1_M2", "M2_end"),
    "A1": ("ICA_term", "A1_A2"),
    "A2": ("A1_A2", "A2_end"),
    "P1": ("BA_top", "P1_P2"),
    "P2": ("P1_P2", "P2_end"),
    "PCoA": ("ICA_PCoA", "P1_P2"),
}


def _sided(name: str, side: str) -> str:
    return name if name == "BA_top" else f"{name}_{side}"


SEGMENT_ENDS: dict[str, tuple[str, str]] = {"BA": (VBJ, "BA_top"), "ACoA": ("A1_A2_R", "A1_A2_L")}
for _side in ("R", "L"):
    for _seg, (_a, _b) in _SIDE_ENDS.items():
        SEGMENT_ENDS[f"{_seg}_{_side}"] = (_sided(_a, _side), _sided(_b, _side))

# Segments that anatomical variation may remove (the self-consistency loss works on these).
VARIABLE_SEGMENTS: tuple[str, ...] = ("ACoA", "PCoA_R", "PCoA_L", "A1_R", "A1_L", "P1_R", "P1_L")
VARIABLE_SEGMENT_MASK = np.array([s in VARIABLE_SEGMENTS for s in SEGMENTS])

# LANDMARK_DEPENDS[i, j]: landmark i is a bifurcation only if variable segment j is present
# (segment j is variable and ends at landmark i).
LANDMARK_DEPENDS = np.zeros((NUM_LANDMARKS, NUM_SEGMENTS), dtype=bool)
for _j, _seg in enumerate(SEGMENTS):
    if _seg in VARIABLE_SEGMENTS:
        for _end in SEGMENT_ENDS[_seg]:
            LANDMARK_DEPENDS[LANDMARK_INDEX[_end], _j] = True
# Landmarks whose attribute variation can change.
VARIABLE_LANDMARK_MASK = LANDMARK_DEPENDS.any(axis=1)


def _mirror_name(name: str) -> str:
    if name.endswith("_R"):
        return name[:-2] + "_L"
    if name.endswith("_L"):
        return name[:-2] + "_R"
    return name


# Left-right flip: channel k maps to MIRROR_LANDMARKS[k] (an involution).
MIRROR_LANDMARKS = np.array([LANDMARK_INDEX[_mirror_name(n)] for n in LANDMARKS])
MIRROR_SEGMENTS = np.array([SEGMENT_INDEX[_mirror_name(n)] for n in SEGMENTS])
MIRROR_CLASSES = np.concatenate([[0], 1 + MIRROR_SEGMENTS])

# Template geometry, RAS mm, basilar tip at the origin (right side given; left mirrors x).
_TEMPLATE_RIGHT = {
    "ICA_prox": (15.0, 9.0, -12.0),
    "ICA_PCoA": (13.0, 11.0, -2.0),
    "ICA_term": (14.0, 15.0, 2.0),
    "M1_M2": (35.0, 17.0, 3.0),
    "M2_end": (44.0, 12.0, 15.0),
    "A1_A2": (1.2, 20.0, 4.0),
    "A2_end": (2.0, 30.0, 22.0),
    "P1_P2": (7.0, 1.0, 1.0),
    "P2_end": (18.0, -14.0, 4.0),
}
TEMPLATE: dict[str, np.ndarray] = {"BA_top": np.zeros(3), VBJ: np.array([0.0, -7.0, -28.0])}
for _n, _p in _TEMPLATE_RIGHT.items():
    TEMPLATE[f"{_n}_R"] = np.array(_p)
    TEMPLATE[f"{_n}_L"] = np.array(_p) * np.array([-1.0, 1.0, 1.0])
TEMPLATE_LANDMARKS = np.stack([TEMPLATE[n] for n in LANDMARKS])  # [19, 3] RAS mm

# Typical radii (mm); a variable segment below HYPOPLASTIC_RADIUS counts as absent.
RADII: dict[str, float] = {"BA": 1.6, "ACoA": 0.6}
for _side in ("R", "L"):
    RADII.update({f"ICA_C6_{_side}": 2.2, f"ICA_C7_{_side}": 1.9, f"M1_{_side}": 1.4,
                  f"M2_{_side}": 1.1, f"A1_{_side}": 1.1, f"A2_{_side}": 1.0,
                  f"P1_{_side}": 1.1, f"P2_{_side}": 1.1, f"PCoA_{_side}": 0.7})
HYPOPLASTIC_RADIUS = 0.5

# Typical aneurysm sites (landmark names).
ANEURYSM_SITES = ("A1_A2_R", "A1_A2_L", "ICA_PCoA_R", "ICA_PCoA_L", "M1_M2_R", "M1_M2_L", "BA_top")


def landmark_attributes(segment_present):
    """Landmark bifurcation attributes implied by segment presence (the cow19 rule).

    Works for booleans (hard rule) and probabilities (soft rule: product of the presence
    probabilities of the variable segments ending at the landmark), with numpy or jax arrays.

    segment_present: [..., 20] bool or float in [0, 1].
    Returns: [..., 19], bool for bool input, else float.
    """
    if getattr(segment_present, "dtype", None) == bool:
        present = np.asarray(segment_present)
        return ~np.any(LANDMARK_DEPENDS & ~present[..., None, :], axis=-1)
    p = segment_present[..., None, :]
    # Segments a landmark does not depend on contribute a factor 1.
    factors = p * LANDMARK_DEPENDS + (1.0 - LANDMARK_DEPENDS)
    return factors.prod(axis=-1)


def segment_dict(values) -> dict[str, bool]:
    """[20] -> {segment name: bool}."""
    return {n: bool(v) for n, v in zip(SEGMENTS, values)}


def landmark_dict(values) -> dict[str, bool]:
    """[19] -> {landmark name: bool}."""
    return {n: bool(v) for n, v in zip(LANDMARKS, values)}


# LPS <-> RAS is the same flip both ways.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
