"""Synthetic Circle of Willis TOF-MRA cases: the project's default data set.

  python -m cowjax.data.synthetic OUT_DIR --num 60 --seed 1234 [--spacing 0.513,0.513,0.8]
      [--preview] [--pathology 0.3]

Each case is one subject: the cow19 template jittered and scaled, smooth tortuous vessels with
tapering radii, the variants of ``shared/cow19.md`` at their population frequencies, optional
aneurysms and stenoses, then a TOF-like acquisition (inflow signal fading along the tree,
partial-volume edges, textured tissue, bright fat/marrow/sinus distractors, bias field, blur,
Rician noise, arbitrary scale) stored in a random orientation (the affine is the truth).

Labelling choices (``segments.nii.gz``): only the 20 cow19 segments get a class. Every other drawn
vessel (cavernous/petrous ICA, ophthalmic, inferior M2 trunk, lenticulostriates, anterior choroidal,
branches beyond M2/A2/P2 ends, SCA, AICA, vertebrals) is 0 there and 1 in ``vessels.nii.gz``.
A hypoplastic variable segment (radius < 0.5 mm) is drawn thin and faint, counts as absent in
attributes.json and is labelled 0 like the other non-segment vessels; an absent segment is not drawn.
Aneurysm lumens are 1 in the vessel mask and never change the segment labels (background outside
the parent vessel). Each case folder also gets ``pathology.json`` (variants, aneurysms, stenoses).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, special

from cowjax import anatomy, figures
from cowjax.data import _parallel, _vessels, io
from cowjax.errors import CowjaxError, atomic_output, atomic_output_dir

PAPER_SPACING = (0.513, 0.513, 0.8)
_SIDES = (("R", 1.0), ("L", -1.0))


# ----------------------------------------------------------------------------------------------
# Anatomy of one subject (subject frame: RAS mm, basilar tip near the origin)

def _sample_variants(rng: np.random.Generator) -> tuple[dict[str, float], dict[str, str]]:
    """Radii (mm; 0 = absent) of every segment, and the variant name of each variable segment."""
    size = rng.uniform(0.85, 1.15)
    radius = {n: r * size * rng.uniform(0.88, 1.12) for n, r in anatomy.RADII.items()}
    kind = {n: "normal" for n in anatomy.VARIABLE_SEGMENTS}

    def shrink(name: str) -> None:
        # Half of the "absent or hypoplastic" vessels are drawn as thin threads.
        if rng.uniform() < 0.5:
            kind[name], radius[name] = "absent", 0.0
        else:
            kind[name], radius[name] = "hypoplastic", rng.uniform(0.25, 0.45)

    for side, _ in _SIDES:
        u = rng.uniform()
        if u < 0.14:                               # fetal PCA: P2 fed by a large PCoA
            shrink(f"P1_{side}")
            kind[f"PCoA_{side}"] = "fetal"
            radius[f"PCoA_{side}"] = rng.uniform(0.95, 1.3)
        elif u < 0.14 + 0.45:                      # absent/hypoplastic PCoA: ~45% per side overall
            shrink(f"PCoA_{side}")
    if rng.uniform() < 0.1:                        # A1 deficit on one side (~5% per side), and
        shrink(f"A1_{'R' if rng.uniform() < 0.5 else 'L'}")
        radius["ACoA"] = rng.uniform(0.8, 1.1)     # the other A1 feeds both A2 via a large ACoA
    elif rng.uniform() < 0.07:
        kind["ACoA"], radius["ACoA"] = "absent", 0.0
    for name in anatomy.VARIABLE_SEGMENTS:         # a naturally thin vessel is hypoplastic too
        if kind[name] == "normal" and radius[name] < anatomy.HYPOPLASTIC_RADIUS:
            kind[name] = "hypoplastic"
    return radius, kind


def _sample_landmarks(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Jittered, scaled template points (landmarks and VBJ), subject frame mm."""
    scale = rng.uniform(0.9, 1.1) * rng.uniform(0.96, 1.04, size=3)
    pts = {}
    for name, p in anatomy.TEMPLATE.items():
        sd = 3.0 if name == anatomy.VBJ else 1.8
        pts[name] = (p + np.clip(rng.normal(0.0, sd, 3), -2.5 * sd, 2.5 * sd)) * scale
    # Paired midline points keep their left-right order (a short ACoA, parallel A2s).
    for name, half in (("A1_A2", rng.uniform(0.8, 2.5)), ("A2_end", rng.uniform(1.0, 3.5))):
        mid = 0.5 * (pts[f"{name}_R"][0] + pts[f"{name}_L"][0])
        pts[f"{name}_R"][0], pts[f"{name}_L"][0] = mid + half, mid - half
    return pts


def _sided(base: str, side: str) -> str:
    return f"{base}_{side}"


def _side(sx: float, x: float, y: float, z: float) -> np.ndarray:
    """An offset given for the right side, mirrored in x for the left (sx = -1)."""
    return np.array([sx * x, y, z])


class _Tree:
    """Vessels in flow order, each with a dense centerline, radius, path length and flow gain."""

    def __init__(self, rng: np.random.Generator, tortuosity: float, stenoses: list[dict]):
        self.rng, self.tortuosity = rng, tortuosity
        self.stenoses = {s["segment"]: s for s in stenoses}
        self.vessels: dict[str, dict] = {}

    def add(self, name: str, control, r0: float, r1: float, label: int, parent: str | None = None,
            at: int = -1, arc0: float = 0.0, brightness: float = 1.0) -> None:
        """Add a vessel through ``control`` [n, 3]; a child starts at point ``at`` of its parent and
        inherits its path length and flow gain there."""
        pts = _vessels.curve(np.asarray(control), self.rng, wiggle=0.04 * self.tortuosity)
        arc = _vessels.arc_length(pts)
        gain = np.full(len(pts), brightness)
        radius = np.linspace(r0, r1, len(pts))
        if parent is not None:
            p = self.vessels[parent]
            arc0, gain = p["arc"][at], gain * p["gain"][at]
        if name in self.stenoses:
            st = self.stenoses[name]
            s0 = st["position"] * arc[-1]
            radius = radius * (1.0 - st["depth"] * np.exp(-0.5 * ((arc - s0) / st["width_mm"]) ** 2))
            # Slower, disturbed flow beyond a stenosis: less TOF signal downstream (children inherit).
            gain = gain * np.where(arc > s0, 1.0 - st["signal_loss"], 1.0)
        self.vessels[name] = dict(points=pts, radius=radius, arc=arc0 + arc, gain=gain, label=label)

    def fork(self, parent: str, names: tuple[str, str], template, radii) -> None:
        """The two branches at the distal end of ``parent`` (M2, A2, P2), in one of two styles.

        template: each branch's control offsets from the end (subject mm, already sided), the
        anatomical default. Half the time instead a trunk runs on in the parent's direction (up to
        20 deg off) and a side branch leaves it at 20-75 deg: the lumens then overlap for a few mm
        beyond the branch point, so the landmark (the centerline branch point) is not where the
        branches visibly part. radii: (start, end) of each branch.
        """
        pts = self.vessels[parent]["points"]
        q = pts[-1]
        if self.rng.uniform() < 0.5:
            controls = [[q, *(q + np.asarray(o) + self.rng.normal(0, s, 3) for o, s in
                              zip(offsets, (1.0, 2.0, 2.0)))] for offsets in template]
        else:
            d = pts[-1] - pts[max(0, len(pts) - 1 - int(6 / _vessels.STEP_MM))]
            d = d / np.linalg.norm(d)
            e = np.cross(d, self.rng.normal(size=3))
            e = e / np.linalg.norm(e)
            controls = []
            for angle in (self.rng.uniform(0, 20), self.rng.uniform(20, 75)):
                a = np.deg2rad(angle)
                u = np.cos(a) * d + np.sin(a) * e
                controls.append([q, q + 6 * u, q + 14 * u + self.rng.normal(0, 1.5, 3),
                                 q + 24 * u + self.rng.normal(0, 3.0, 3)])
                e = -e  # the trunk bends away from the side branch
            if self.rng.uniform() < 0.5:  # which branch is the trunk
                controls = controls[::-1]
        for name, control, (r0, r1) in zip(names, controls, radii):
            self.add(name, control, r0, r1, 0, parent)

    def point(self, name: str, fraction: float) -> tuple[np.ndarray, int]:
        pts = self.vessels[name]["points"]
        i = int(round(fraction * (len(pts) - 1)))
        return pts[i], i


def _build_tree(rng: np.random.Generator, lm: dict[str, np.ndarray], radius: dict[str, float],
                kind: dict[str, str], stenoses: list[dict]) -> _Tree:
    """All arteries of one subject, in flow order (parents before children)."""
    tree = _Tree(rng, tortuosity=rng.uniform(0.3, 1.6), stenoses=stenoses)

    def j(s=1.0):                                                  # control-point jitter
        return rng.normal(0.0, s, 3)

    def seg(name: str, a: str, b: str, via, parent):
        """A cow19 segment from landmark a to b; hypoplastic ones are drawn faint and unlabelled."""
        r = radius[name]
        if r <= 0.0:
            return
        label = 1 + anatomy.SEGMENT_INDEX[name] if r >= anatomy.HYPOPLASTIC_RADIUS else 0
        faint = 1.0 if label else rng.uniform(0.5, 0.8)
        tree.add(name, [lm[a], *via, lm[b]], r, r * rng.uniform(0.85, 0.97), label, parent,
                 brightness=faint)

    def mid(a, b, offset, s=1.0):
        return 0.5 * (lm[a] + lm[b]) + np.asarray(offset) + j(s)

    # Vertebrals rise to the VBJ (the larger one is the BA's parent for path length).
    vr = {side: rng.uniform(1.2, 1.9) for side, _ in _SIDES}
    for side, sx in _SIDES:
        vbj = lm[anatomy.VBJ]
        tree.add(f"vert_{side}", [vbj + _side(sx, 9, -6, -32) + j(), vbj + _side(sx, 6, -4, -15) + j(),
                                  vbj + _side(sx, 2.5, -1, -5) + j(), vbj],
                 vr[side], vr[side] * 0.95, 0, arc0=rng.uniform(0, 30))
    big = max(vr, key=vr.get)
    seg("BA", anatomy.VBJ, "BA_top", [mid(anatomy.VBJ, "BA_top", (rng.uniform(-3, 3), 1.0, 0.0))],
        f"vert_{big}")

    for side, sx in _SIDES:
        n = functools.partial(_sided, side=side)
        o = functools.partial(_side, sx)
        p = lm[n("ICA_prox")]
        r_ica = radius[n("ICA_C6")]
        # Petrous/cavernous ICA (the siphon) below ICA_prox, drawn from below so flow runs upward.
        tree.add(n("ICAcav"), [p + o(3, -12, -30) + j(2), p + o(2, -10, -13) + j(), p + o(1, -1, -9) + j(),
                               p + o(0.5, 5, -5) + j(0.7), p],
                 r_ica * 1.1, r_ica, 0, arc0=rng.uniform(0, 30))
        tree.add(n("ophth"), [p, p + o(3, 8, 1) + j(), p + o(8, 20, 0) + j(2), p + o(12, 32, 2) + j(2)],
                 rng.uniform(0.6, 0.85), 0.45, 0, n("ICAcav"))
        seg(n("ICA_C6"), n("ICA_prox"), n("ICA_PCoA"), [mid(n("ICA_prox"), n("ICA_PCoA"), o(0.5, 1, 0), 0.5)],
            n("ICAcav"))
        seg(n("ICA_C7"), n("ICA_PCoA"), n("ICA_term"), [], n("ICA_C6"))
        if rng.uniform() < 0.6:                                     # anterior choroidal
            q, i = tree.point(n("ICA_C7"), rng.uniform(0.2, 0.5))
            tree.add(n("achor"), [q, q + o(3, -3, 1), q + o(8, -10, 3) + j(), q + o(12, -18, 6) + j(2)],
                     rng.uniform(0.35, 0.5), 0.3, 0, n("ICA_C7"), i)
        seg(n("M1"), n("ICA_term"), n("M1_M2"), [mid(n("ICA_term"), n("M1_M2"), (0, 1, -1))], n("ICA_C7"))
        for k in range(rng.integers(2, 5)):                         # lenticulostriates
            q, i = tree.point(n("M1"), rng.uniform(0.15, 0.65))
            tree.add(n(f"lsa{k}"), [q, q + np.array([rng.uniform(-2, 2), rng.uniform(-3, 1), 6]),
                                    q + np.array([rng.uniform(-3, 3), rng.uniform(-4, 2), 14])],
                     rng.uniform(0.3, 0.45), 0.25, 0, n("M1"), i)
        seg(n("M2"), n("M1_M2"), n("M2_end"), [mid(n("M1_M2"), n("M2_end"), o(2, 1, -1))], n("M1"))
        q = lm[n("M1_M2")]                                          # inferior M2 trunk
        tree.add(n("M2inf"), [q, q + o(6, -5, -3) + j(), q + o(10, -12, 0) + j(2), q + o(12, -20, 6) + j(2)],
                 radius[n("M2")] * rng.uniform(0.8, 1.0), 0.7, 0, n("M1"))
        tree.fork(n("M2"), (n("M3_0"), n("M3_1")),
                  [[o(3, 5, 8), o(4, 8, 18)], [o(5, -5, 6), o(8, -12, 14)]],
                  [(rng.uniform(0.65, 0.85), 0.5), (rng.uniform(0.65, 0.85), 0.5)])

    for side, sx in _SIDES:                                         # anterior circulation
        n = functools.partial(_sided, side=side)
        o = functools.partial(_side, sx)
        seg(n("A1"), n("ICA_term"), n("A1_A2"), [mid(n("ICA_term"), n("A1_A2"), (0, 2, 1))], n("ICA_C7"))
    feed = "A1_R" if kind["A1_R"] == "normal" else "A1_L"
    seg("ACoA", "A1_A2_R", "A1_A2_L", [mid("A1_A2_R", "A1_A2_L", (0, 0.4, 0.3), 0.3)], feed)
    for side, sx in _SIDES:
        n = functools.partial(_sided, side=side)
        o = functools.partial(_side, sx)
        parent = n("A1") if kind[n("A1")] == "normal" else "ACoA"
        seg(n("A2"), n("A1_A2"), n("A2_end"), [mid(n("A1_A2"), n("A2_end"), (0, 1.5, -1), 0.7)], parent)
        tree.fork(n("A2"), (n("peri"), n("callosomarg")),
                  [[o(0.3, -4, 8), o(0.5, -14, 14), o(0.5, -28, 16)], [o(1, 6, 8), o(1.5, 6, 20)]],
                  [(rng.uniform(0.7, 0.9), 0.55), (rng.uniform(0.6, 0.8), 0.45)])

    for side, sx in _SIDES:                                         # posterior circulation
        n = functools.partial(_sided, side=side)
        o = functools.partial(_side, sx)
        q, i = tree.point("BA", rng.uniform(0.85, 0.93))            # superior cerebellar
        tree.add(n("SCA"), [q, q + o(5, -1, 0) + j(0.5), q + o(10, -5, -1) + j(), q + o(14, -12, 0) + j(2),
                            q + o(15, -20, 2) + j(2)], rng.uniform(0.65, 0.9), 0.5, 0, "BA", i)
        if rng.uniform() < 0.7:                                     # anterior inferior cerebellar
            q, i = tree.point("BA", rng.uniform(0.2, 0.45))
            tree.add(n("AICA"), [q, q + o(6, -2, -2) + j(), q + o(13, -6, -4) + j(), q + o(18, -12, -6) + j(2)],
                     rng.uniform(0.5, 0.7), 0.4, 0, "BA", i)
        seg(n("P1"), "BA_top", n("P1_P2"), [mid("BA_top", n("P1_P2"), (0, 0.5, 1), 0.5)], "BA")
        seg(n("PCoA"), n("ICA_PCoA"), n("P1_P2"), [mid(n("ICA_PCoA"), n("P1_P2"), o(0.5, 0, -1))], n("ICA_C6"))
        parent = n("P1") if kind[n("P1")] == "normal" else n("PCoA")
        seg(n("P2"), n("P1_P2"), n("P2_end"), [lm[n("P1_P2")] + o(6, -6, -1) + j()], parent)
        tree.fork(n("P2"), (n("P3a"), n("P3b")),
                  [[o(2, -10, -3), o(4, -22, -4)], [o(-3, -8, 6), o(-5, -18, 14)]],
                  [(rng.uniform(0.65, 0.85), 0.5), (rng.uniform(0.6, 0.8), 0.45)])
    return tree


def _sample_pathology(rng: np.random.Generator, lm: dict[str, np.ndarray]) -> dict:
    """Saccular aneurysms at typical sites and/or one stenosis, as plain data (subject frame)."""
    found = {"aneurysms": [], "stenoses": []}
    has_aneurysm = rng.uniform() < 0.75
    if has_aneurysm:
        for site in rng.choice(anatomy.ANEURYSM_SITES, size=1 + int(rng.uniform() < 0.2), replace=False):
            site = str(site)
            ends = [b if a == site else a for a, b in anatomy.SEGMENT_ENDS.values() if site in (a, b)]
            away = lm[site] - np.mean([lm[e] for e in ends], axis=0)
            direction = away / np.linalg.norm(away) + rng.normal(0.0, 0.5, 3)
            direction /= np.linalg.norm(direction)
            dome = rng.uniform(1.0, 5.0)                              # radius: 2-10 mm diameter
            centre = lm[site] + direction * (0.9 * dome + 0.5)         # the neck sits on the site
            found["aneurysms"].append(dict(site=site, diameter_mm=round(2 * dome, 2),
                                           centre_subject=centre.round(2).tolist(),
                                           brightness=round(rng.uniform(0.6, 1.0), 2)))
    if not has_aneurysm or rng.uniform() < 0.4:
        # Non-variable segments: always present and never hypoplastic.
        name = str(rng.choice(["BA", "M1_R", "M1_L", "ICA_C6_R", "ICA_C6_L", "P2_R", "P2_L", "A2_R", "A2_L"]))
        depth = rng.uniform(0.4, 0.75)
        found["stenoses"].append(dict(segment=name, position=round(rng.uniform(0.3, 0.7), 3),
                                      depth=round(depth, 3), width_mm=round(rng.uniform(1.0, 3.0), 2),
                                      signal_loss=round(depth * rng.uniform(0.3, 0.8), 3)))
    return found


def _aneurysm_vessels(pathology: dict, lm: dict[str, np.ndarray]) -> dict[str, dict]:
    """Aneurysm lumens as short tubes (neck at the site, a sphere at the dome) that label nothing."""
    out = {}
    for a in pathology["aneurysms"]:
        centre, dome = np.array(a["centre_subject"]), a["diameter_mm"] / 2
        out[f"aneurysm_{a['site']}"] = dict(
            points=np.stack([lm[a["site"]], centre, centre]), radius=np.array([0.6, 0.9, 1.0]) * dome,
            arc=np.full(3, 40.0), gain=np.full(3, a["brightness"]), label=-1)
    return out


# ----------------------------------------------------------------------------------------------
# Pose, grid and appearance

def _rotation(angles_deg) -> np.ndarray:
    """[3] angles about x, y, z (degrees) -> [3, 3] rotation."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _grid(rng: np.random.Generator, world_points: np.ndarray, spacing) -> tuple[np.ndarray, tuple]:
    """A (sometimes oblique) voxel grid covering ``world_points`` [N, 3] with a random margin."""
    rot = _rotation(rng.uniform(-12, 12, 3)) if rng.uniform() < 0.3 else np.eye(3)
    q = world_points @ rot                                          # grid-frame coordinates
    # Mostly a tight slab around the circle, sometimes a much wider field of view.
    lo_mm, hi_mm = ([8, 8, 6], [25, 25, 18]) if rng.uniform() < 0.8 else ([15, 15, 10], [40, 40, 30])
    margin_lo, margin_hi = rng.uniform(lo_mm, hi_mm), rng.uniform(lo_mm, hi_mm)
    lo, hi = q.min(0) - margin_lo, q.max(0) + margin_hi
    spacing = np.asarray(spacing, dtype=np.float64)
    shape = tuple(int(n) for n in np.ceil((hi - lo) / spacing) + 1)
    affine = np.eye(4)
    affine[:3, :3] = rot * spacing
    affine[:3, 3] = rot @ lo
    return affine, shape


class _Canvas:
    """Paints shapes given in the subject frame onto the voxel grid, each inside its bounding box."""

    def __init__(self, affine: np.ndarray, shape: tuple, rot: np.ndarray, shift: np.ndarray):
        # subject = m @ ijk + c
        self.m = rot.T @ affine[:3, :3]
        self.c = rot.T @ (affine[:3, 3] - shift)
        self.minv = np.linalg.inv(self.m)
        self.shape = shape

    def coords(self, sub: tuple[slice, ...]) -> list[np.ndarray]:
        """Subject-frame x, y, z (float32) of the voxels in ``sub``."""
        idx = [np.arange(s.start, s.stop, dtype=np.float32) for s in sub]
        out = []
        for a in range(3):
            acc = np.float32(self.c[a])
            for b in range(3):
                shp = [1, 1, 1]
                shp[b] = -1
                acc = acc + (np.float32(self.m[a, b]) * idx[b]).reshape(shp)
            out.append(acc)
        return out

    def box(self, lo, hi) -> tuple[slice, ...] | None:
        corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T
        ijk = (corners - self.c) @ self.minv.T
        i0 = np.maximum(np.floor(ijk.min(0)).astype(int), 0)
        i1 = np.minimum(np.ceil(ijk.max(0)).astype(int) + 1, self.shape)
        return None if np.any(i1 <= i0) else tuple(slice(a, b) for a, b in zip(i0, i1))

    def ellipsoid(self, centre, axes, edge_mm: float = 0.8, full: bool = False):
        """(sub, soft mask in [0, 1]) of an axis-aligned ellipsoid, or None when out of view."""
        centre, axes = np.asarray(centre, float), np.asarray(axes, float)
        sub = (tuple(slice(0, n) for n in self.shape) if full
               else self.box(centre - axes - 3 * edge_mm, centre + axes + 3 * edge_mm))
        if sub is None:
            return None
        x = self.coords(sub)
        rr = np.sqrt(sum(((x[a] - np.float32(centre[a])) / np.float32(axes[a])) ** 2 for a in range(3)))
        return sub, special.expit((1.0 - rr) * np.float32(axes.min() / edge_mm))


def _noise(rng: np.random.Generator, shape: tuple, cell_vox) -> np.ndarray:
    """Smooth random field, about unit variance, correlated over ``cell_vox`` voxels per axis."""
    coarse = np.maximum(2, np.ceil(np.array(shape) / np.asarray(cell_vox)).astype(int) + 1)
    field = rng.normal(size=tuple(coarse)).astype(np.float32)
    # Separable linear interpolation as three small matrix products (much faster than ndimage.zoom).
    for axis, (n, c) in enumerate(zip(shape, coarse)):
        pos = np.linspace(0, c - 1, n)
        left = np.minimum(np.floor(pos).astype(int), c - 2)
        w = (pos - left).astype(np.float32)
        interp = np.zeros((n, c), np.float32)
        interp[np.arange(n), left] = 1 - w
        interp[np.arange(n), left + 1] = w
        field = np.moveaxis(np.tensordot(interp, field, axes=([1], [axis])), 0, axis)
    return field / max(float(field.std()), 1e-6)


def _paint(img, canvas, centre, axes, value, edge_mm=0.8, full=False, multiply=False):
    hit = canvas.ellipsoid(centre, axes, edge_mm, full)
    if hit is None:
        return
    sub, m = hit
    v = value[sub] if isinstance(value, np.ndarray) else np.float32(value)
    img[sub] = img[sub] * (1 + (v - 1) * m) if multiply else img[sub] * (1 - m) + v * m


def _background(rng: np.random.Generator, canvas: _Canvas, spacing, lm: dict[str, np.ndarray]) -> np.ndarray:
    """Noise-free tissue: textured brain, dark CSF cisterns, skull, bright scalp fat and marrow."""
    shape = canvas.shape
    spacing = np.asarray(spacing)
    img = np.full(shape, rng.uniform(0.0, 0.02), np.float32)
    wm = rng.uniform(0.08, 0.22)
    gm = wm * rng.uniform(0.7, 1.25)
    folds = special.expit(3.0 * _noise(rng, shape, rng.uniform(3, 7) / spacing))
    tissue = (wm + (gm - wm) * folds) * (1 + rng.uniform(0.03, 0.12) * _noise(rng, shape, 1.5 / spacing))
    tissue *= 1 + rng.uniform(0.05, 0.2) * _noise(rng, shape, 20.0 / spacing)
    csf, fat = rng.uniform(0.01, 0.07), rng.uniform(0.25, 0.6)

    centre = np.array([0.0, -12.0, 15.0]) + rng.normal(0, 3, 3)
    axes = np.array([66.0, 86.0, 62.0]) * rng.uniform(0.92, 1.08)
    skull, scalp = rng.uniform(5, 9), rng.uniform(3, 7)
    _paint(img, canvas, centre, axes + skull + scalp, fat, 1.0, full=True)
    _paint(img, canvas, centre, axes + skull, rng.uniform(0.005, 0.05), 1.0, full=True)
    _paint(img, canvas, centre, axes, tissue, 1.5, full=True)

    def maybe(p):
        return rng.uniform() < p

    _paint(img, canvas, (0, -22, -22) + rng.normal(0, 2, 3), (13, 13, 20), rng.uniform(0.8, 1.25), 2.0,
           multiply=True)                                                          # brainstem tone
    for side in (1, -1):                                                           # cisterns, fissures
        _paint(img, canvas, (side * 30, 14, 4) + rng.normal(0, 2, 3), (14, 4, 7) * rng.uniform(0.6, 1.3, 3),
               csf, 1.5)
        _paint(img, canvas, (side * 12, -5, 22) + rng.normal(0, 2, 3), (6, 22, 8) * rng.uniform(0.5, 1.3, 3),
               csf, 1.5)
    ba = lm["BA_top"]
    _paint(img, canvas, ba + (0, 8, -3) + rng.normal(0, 1.5, 3), (15, 12, 6) * rng.uniform(0.6, 1.2, 3), csf, 2.0)
    _paint(img, canvas, ba + (0, -4, -18), (9, 5, 15) * rng.uniform(0.6, 1.2, 3), csf, 1.5)
    _paint(img, canvas, (0, 30, 25), (rng.uniform(0.8, 2.0), 35, 30), csf, 0.8)
    _paint(img, canvas, (0, -6, 6), (2, 10, 7) * rng.uniform(0.6, 1.3, 3), csf, 1.0)
    if maybe(0.9):                                                                 # sphenoid sinus (air)
        _paint(img, canvas, (0, 20, -25) + rng.normal(0, 2, 3), (12, 10, 9) * rng.uniform(0.7, 1.2, 3),
               rng.uniform(0.0, 0.02), 1.5)
    if maybe(0.85):                                                                # clivus marrow fat
        _paint(img, canvas, (0, 3, -32) + rng.normal(0, 2, 3), (7, 5, 13) * rng.uniform(0.7, 1.2, 3),
               rng.uniform(0.2, 0.5), 1.5)
    for side in (1, -1):
        if maybe(0.9):                                                             # orbital fat
            _paint(img, canvas, (side * 30, 58, -15) + rng.normal(0, 3, 3), (12, 16, 10), rng.uniform(0.25, 0.6))
        if maybe(0.6):                                                             # cavernous sinus
            _paint(img, canvas, lm[f"ICA_prox_{'R' if side > 0 else 'L'}"] + (0, -3, -6), (5, 8, 5),
                   rng.uniform(0.15, 0.5), 1.5)
        if maybe(0.4):                                                             # petrous apex marrow
            _paint(img, canvas, (side * 25, -10, -30) + rng.normal(0, 3, 3), (8, 6, 5), rng.uniform(0.2, 0.5))
    # A few bright blobs anywhere away from the landmarks (subacute blood, fat, flow artefacts).
    pts = np.stack(list(lm.values()))
    for _ in range(rng.integers(0, 4)):
        c = pts.mean(0) + rng.uniform(-45, 45, 3) * (1, 0.8, 0.6)
        if np.min(np.linalg.norm(pts - c, axis=1)) > 10:
            _paint(img, canvas, c, rng.uniform(2, 7, 3), rng.uniform(0.2, 0.6), 1.0)
    return img


def _veins(rng: np.random.Generator, to_world) -> list[_vessels.Tube]:
    """Dural sinuses and deep veins: tubes that TOF shows with variable (often partial) brightness."""
    level = rng.uniform(0.05, 0.5)
    paths = [([(0, -28, 26), (0, -45, 18), (0, -62, 8)], (2.5, 3.5)),                      # straight sinus
             ([(0, 55, 45), (0, 20, 70), (0, -30, 72), (0, -70, 35), (0, -72, 5)], (3.5, 5)),  # sagittal
             ([(0, -28, 12), (0, -29, 20), (0, -28, 26)], (1.5, 2.5))]                       # Galen
    for sx in (1, -1):
        paths.append(([(sx * 3, -70, 5), (sx * 30, -72, -2), (sx * 45, -55, -12), (sx * 44, -40, -28),
                       (sx * 40, -32, -45)], (3, 4.5)))                                     # transverse/sigmoid
        paths.append(([(sx * 12, 8, -6), (sx * 15, -4, -2), (sx * 12, -18, 6), (sx * 3, -28, 12)],
                      (0.7, 1.3)))                                                          # basal vein
    tubes = []
    for control, (r_lo, r_hi) in paths:
        if rng.uniform() < 0.2:
            continue
        pts = _vessels.curve(np.asarray(control, float) + rng.normal(0, 2, (len(control), 3)), rng, 0.02)
        r = np.full(len(pts), rng.uniform(r_lo, r_hi))
        tubes.append(_vessels.Tube(to_world(pts), r, np.full(len(pts), level * rng.uniform(0.6, 1.3)), -1))
    return tubes


def _arterial_signal(rng: np.random.Generator, v: dict, saturation_mm: float) -> np.ndarray:
    """TOF brightness: inflow signal fading with path length (saturation), dimmer in slow small
    vessels, with a gentle random modulation along the vessel (flow inhomogeneity)."""
    fresh = np.exp(-v["arc"] / saturation_mm)
    wobble = 1.0 + 0.08 * np.sin(v["arc"] / rng.uniform(3.0, 12.0) + rng.uniform(0, 2 * np.pi))
    return v["gain"] * fresh * wobble * (0.6 + 0.4 * np.clip(v["radius"] / 1.2, 0.0, 1.0))


def _acquire(rng: np.random.Generator, img: np.ndarray, affine: np.ndarray, spacing) -> np.ndarray:
    """Blur (PSF), slab profile, bias field, Rician noise, arbitrary scale and offset."""
    spacing = np.asarray(spacing, float)
    sharp = rng.uniform() < 0.75                                    # else a blurrier, low-res look
    psf_mm = rng.uniform([0.15, 0.15, 0.2], [0.55, 0.55, 0.7] if sharp else [0.9, 0.9, 1.2])
    img = ndimage.gaussian_filter(img, psf_mm / spacing, truncate=3.0)
    shape = img.shape
    # Normalised coordinates in [-1, 1] per axis, broadcastable.
    u = [np.linspace(-1, 1, n, dtype=np.float32).reshape([-1 if a == b else 1 for b in range(3)])
         for a, n in enumerate(shape)]
    log_bias = sum(np.float32(rng.normal(0, 0.12)) * u[a] for a in range(3))
    log_bias = log_bias + sum(np.float32(rng.normal(0, 0.08)) * u[a] * u[b] for a in range(3) for b in range(a, 3))
    img = img * np.exp(log_bias * np.float32(rng.uniform(0.5, 2.5)))
    if rng.uniform() < 0.5:
        # Multi-slab TOF: signal dips at the slab boundaries along the world z axis.
        z = sum(np.float32(affine[2, a]) * np.arange(n, dtype=np.float32).reshape(
            [-1 if a == b else 1 for b in range(3)]) for a, n in enumerate(shape))
        phase = (z - np.float32(rng.uniform(0, 40))) / np.float32(rng.uniform(18, 35))
        dip = np.cos(np.float32(np.pi) * phase) ** 2
        dip = (dip * dip) ** 2                                      # cos^8 (integer powers are slow)
        img = img * (1 - np.float32(rng.uniform(0.05, 0.25)) * dip)
    img = np.maximum(img, 0) ** np.float32(rng.uniform(0.8, 1.25))
    sigma = np.float32(rng.uniform(0.008, 0.045))
    noise = rng.standard_normal((2,) + shape, dtype=np.float32) * sigma
    img = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)
    integer = rng.uniform() < 0.5                                   # integer scanner output
    scale = np.exp(rng.uniform(np.log(300.0 if integer else 0.5), np.log(4000.0)))
    img = img * np.float32(scale) + np.float32(rng.uniform(-0.02, 0.1) * scale)
    if integer:
        img = np.clip(np.round(img), -32768, 32767)
    return img.astype(np.float32)


def _orientation_codes(rng: np.random.Generator) -> tuple[str, str, str]:
    u = rng.uniform()
    if u < 0.3:
        return ("R", "A", "S")
    if u < 0.6:
        return ("L", "P", "S")
    pairs = [("R", "L"), ("A", "P"), ("S", "I")]
    return tuple(pairs[a][rng.integers(2)] for a in rng.permutation(3))


def reorient(arrays: list[np.ndarray], affine: np.ndarray, codes) -> tuple[list[np.ndarray], np.ndarray]:
    """Permute/flip voxel arrays to axis codes (e.g. ("L","P","S")), adjusting the affine [4, 4].

    Exact (no resampling): every voxel keeps its world position.
    """
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                                nib.orientations.axcodes2ornt(tuple(codes)))
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, arrays[0].shape)
    return [np.ascontiguousarray(nib.orientations.apply_orientation(a, transform)) for a in arrays], new_affine


# ----------------------------------------------------------------------------------------------
# Public API

def generate_case(seed: int, index: int, spacing=PAPER_SPACING, pathology_fraction: float = 0.3,
                  orientation: tuple[str, str, str] | None = None, return_info: bool = False):
    """One synthetic subject, deterministic in (seed, index) whatever else is generated.

    spacing: (3,) mm voxel size. orientation: axis codes to store the arrays in (default: random,
    RAS, LPS or any other); it changes nothing else. Returns an ``io.Case`` (image [X,Y,Z] float32,
    affine [4,4], landmarks [19,3] RAS mm, vessels uint8, segments uint8 0..20, attributes), and
    with ``return_info`` also a JSON-able dict of the variants and pathology.
    """
    if seed < 0 or index < 0:
        raise CowjaxError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    streams = np.random.SeedSequence([seed, index]).spawn(6)
    r_anat, r_path, r_tree, r_pose, r_look, r_orient = (np.random.default_rng(s) for s in streams)

    radius, kind = _sample_variants(r_anat)
    lm = _sample_landmarks(r_anat)
    pathology = {"aneurysms": [], "stenoses": []}
    if r_path.uniform() < pathology_fraction:
        pathology = _sample_pathology(r_path, lm)
    tree = _build_tree(r_tree, lm, radius, kind, pathology["stenoses"])
    vessels = dict(tree.vessels, **_aneurysm_vessels(pathology, lm))

    rot = _rotation(r_pose.uniform(-10, 10, 3))
    shift = r_pose.uniform(-8, 8, 3)

    def to_world(points):                                           # subject frame -> world RAS
        return np.asarray(points) @ rot.T + shift

    world_lm = to_world(np.stack([lm[n] for n in anatomy.LANDMARKS]))
    for a in pathology["aneurysms"]:
        a["centre_world"] = to_world(np.array(a["centre_subject"])).round(3).tolist()
    affine, shape = _grid(r_pose, np.vstack([world_lm, to_world(lm[anatomy.VBJ])[None]]), spacing)

    canvas = _Canvas(affine, shape, rot, shift)
    img = _background(r_look, canvas, spacing, lm)
    edge = 0.3 * float(np.prod(spacing)) ** (1 / 3)
    veins, vein_occ, _, _ = _vessels.render(_veins(r_look, to_world), affine, shape, edge)
    img = img * (1 - vein_occ) + veins
    # Broad appearance styles: strong or weak background suppression, strong or no saturation.
    img = img * np.float32(r_look.uniform(0.15, 0.5) if r_look.uniform() < 0.15 else 1.0)
    saturation = r_look.uniform(150, 500) if r_look.uniform() < 0.85 else 5000.0
    tubes = [_vessels.Tube(to_world(v["points"]), v["radius"], _arterial_signal(r_look, v, saturation),
                           v["label"])
             for v in vessels.values()]
    lumen, occupancy, vessel_mask, segments = _vessels.render(tubes, affine, shape, edge)
    img = img * (1 - occupancy) + lumen
    img = _acquire(r_look, img, affine, spacing)

    codes = _orientation_codes(r_orient) if orientation is None else tuple(orientation)
    (img, vessel_mask, segments), affine = reorient([img, vessel_mask.astype(np.uint8), segments], affine, codes)

    present = np.array([radius[s] >= anatomy.HYPOPLASTIC_RADIUS for s in anatomy.SEGMENTS])
    attributes = {"segments": anatomy.segment_dict(present),
                  "landmarks": anatomy.landmark_dict(anatomy.landmark_attributes(present))}
    case = io.Case(case_id=f"case_{index:04d}", image=img, affine=affine, landmarks=world_lm,
                   vessels=vessel_mask, segments=segments, attributes=attributes)
    if not return_info:
        return case
    info = dict(seed=seed, index=index, orientation="".join(codes), variants=kind,
                radii_mm={k: round(float(v), 3) for k, v in radius.items()}, **pathology)
    return case, info


def _write_case(out_dir: Path, case: io.Case, info: dict, preview: bool) -> Path:
    """Write one case folder atomically (``atomic_output_dir``)."""
    final = out_dir / case.case_id
    with atomic_output_dir(final) as tmp:
        io.save_case(tmp, case)
        (tmp / "pathology.json").write_text(json.dumps(info, indent=1))
        if preview:
            figures.case_preview(tmp / "preview.png", case)
    return final


def generate_dataset(out_dir: str | Path, num: int, seed: int, spacing=PAPER_SPACING,
                     pathology_fraction: float = 0.3, preview: bool = False,
                     progress: bool = True, workers: int | None = None) -> list[Path]:
    """Write cases ``case_0000`` .. ``case_{num-1}`` under ``out_dir`` (created if missing),
    over ``workers`` processes (default: one per core).

    Each case is ``generate_case(seed, index, ...)``, so a case does not depend on ``num``.
    Returns the case folders.
    """
    if num < 1:
        raise CowjaxError(f"--num must be at least 1, got {num}")
    if not 0.0 <= pathology_fraction <= 1.0:
        raise CowjaxError(f"pathology fraction must be in [0, 1], got {pathology_fraction}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CowjaxError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(out_dir, seed, index, tuple(spacing), pathology_fraction, preview)
            for index in range(num)]
    return _parallel.map_cases(_make_case, jobs, "synthetic cases", progress, workers)


def _make_case(job) -> Path:
    out_dir, seed, index, spacing, pathology_fraction, preview = job
    case, info = generate_case(seed, index, spacing, pathology_fraction, return_info=True)
    return _write_case(out_dir, case, info, preview)


def _parse_spacing(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0.1 <= v <= 10.0 for v in values):
        raise CowjaxError(f"--spacing must be three numbers in [0.1, 10] mm like 0.513,0.513,0.8, "
                          f"got {text!r}")
    return values


class _Parser(argparse.ArgumentParser):
    def error(self, message):                                       # one line, exit 2
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    parser = _Parser(prog="python -m cowjax.data.synthetic",
                     description="Write synthetic Circle of Willis TOF-MRA cases.")
    parser.add_argument("out_dir")
    parser.add_argument("--num", type=int, required=True, help="number of cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacing", default=",".join(map(str, PAPER_SPACING)), help="X,Y,Z mm")
    parser.add_argument("--preview", action="store_true", help="write <case>/preview.png (MIPs)")
    parser.add_argument("--pathology", type=float, default=0.3, help="share of cases with pathology")
    args = parser.parse_args(argv)
    try:
        if args.seed < 0:
            raise CowjaxError(f"--seed must be non-negative, got {args.seed}")
        spacing = _parse_spacing(args.spacing)
        start = time.perf_counter()
        dirs = generate_dataset(args.out_dir, args.num, args.seed, spacing, args.pathology,
                                preview=args.preview)
    except CowjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = (time.perf_counter() - start) / len(dirs)
    print(f"wrote {len(dirs)} cases to {args.out_dir}: {seconds:.2f} s per case")
    return 0


if __name__ == "__main__":
    sys.exit(main())
