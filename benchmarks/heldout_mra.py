"""An independent held-out generator of TOF-MRA-like Circle of Willis cases (cow19 contract).

Written from ``shared/cow19.md``, ``cowjax/anatomy.py`` and ``cowjax/data/io/`` only, without
reading the project's own synthetic generator, so that a model trained on that generator can be
measured on data it has never seen the like of.

    python benchmarks/heldout_mra.py OUT_DIR --num N --seed S [--spacing 0.5,0.5,0.8] [--preview]

Modelling, in short:
  * geometry: template landmarks (anatomy.TEMPLATE) under a global anisotropic scale (0.85-1.15)
    and a per-point jitter (3-6 mm RMS per case; the two A1/A2 junctions move together);
    every vessel is a centripetal Catmull-Rom spline through its end landmarks, anatomical via
    points (moved with a linear blend of the end displacements) and random tortuosity knots;
    the ICA siphon goes down below ICA_prox, the basilar down to two vertebrals, M2/A2/P2 split
    into further branches beyond their ends, plus ophthalmic, anterior choroidal, SCA, AICA, PICA,
    lenticulostriate and random small arteries;
  * variation: PCoA / P1 (fetal PCA) / A1 / ACoA absent or hypoplastic (< 0.5 mm) at roughly the
    cow19.md frequencies, landmark positions kept on the remaining vessel; radii +-25 %;
  * rendering: per centreline sample a super-Gaussian tube profile exp(-ln2 (d/r_eff)^4) with a
    partial-volume amplitude for thin vessels, combined by maximum of occupancy; vessel brightness
    fades with path length from the inflow roots (ICA and vertebrals) and more for in-plane flow;
    calibre wobbles +-8 % along each vessel, a focal stenosis in ~15 % of cases, and venous
    distractors (cavernous / sigmoid sinus, kept out of the vessel mask) in some;
  * appearance: an ellipsoidal head with brain / CSF rim / dark skull with diploe / bright scalp
    fat / skin / air, a skull base (middle, anterior, posterior fossa) with a dark sphenoid sinus
    and bright orbital fat, dark basal cisterns around the circle, brain texture from two noise
    scales plus sulcus-like dark level-set sheets, a multiplicative smooth bias field, multi-slab
    "venetian blind" modulation along the slice axis, a slight blur and Rician noise (SNR 6-30);
    aneurysm-like lobulated blobs at ACoA / MCA bifurcation / ICA-PCoA / basilar tip in ~30 %;
  * pose and storage: random head rotation (<= 12 deg) and translation (<= 10 mm), a field of view
    of random size and offset around the circle, storage RAS / LPS / signed-permuted / oblique
    with the affine telling the truth, landmarks written in LPS or RAS (declared in the file).

Deterministic per (seed, index): each case draws from ``np.random.default_rng([seed, index])``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage, special

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cowjax import anatomy  # noqa: E402
from cowjax.data import io  # noqa: E402

LN2 = math.log(2.0)

# ------------------------------------------------------------------------------------ geometry

# Anatomical via points (head frame, RAS mm, right side; the left mirrors x) between segment ends.
_VIA = {
    "ICA_C6": [], "ICA_C7": [],
    "M1": [(24.0, 16.5, 1.5)],
    "M2": [(40.0, 16.0, 8.5)],
    "A1": [(7.5, 18.0, 3.5)],
    "A2": [(1.6, 24.0, 12.0)],
    "P1": [],
    "P2": [(13.5, -6.0, 0.0)],
    "PCoA": [(10.0, 6.0, -1.0)],
}


def _rand_unit(rng):
    v = rng.normal(size=3)
    return v / (np.linalg.norm(v) + 1e-9)


def _rotation(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def catmull_rom(points, step):
    """Centripetal Catmull-Rom spline through ``points`` [K, 3], resampled every ``step`` mm."""
    p = np.asarray(points, float)
    if len(p) < 2:
        return p.copy()
    ext = np.concatenate([2 * p[:1] - p[1:2], p, 2 * p[-1:] - p[-2:-1]])
    out = []
    for i in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[i - 1:i + 3]
        t0 = 0.0
        t1 = t0 + max(np.linalg.norm(p1 - p0), 1e-3) ** 0.5
        t2 = t1 + max(np.linalg.norm(p2 - p1), 1e-3) ** 0.5
        t3 = t2 + max(np.linalg.norm(p3 - p2), 1e-3) ** 0.5
        t = np.linspace(t1, t2, 40, endpoint=False)[:, None]
        a1 = (t1 - t) / (t1 - t0) * p0 + (t - t0) / (t1 - t0) * p1
        a2 = (t2 - t) / (t2 - t1) * p1 + (t - t1) / (t2 - t1) * p2
        a3 = (t3 - t) / (t3 - t2) * p2 + (t - t2) / (t3 - t2) * p3
        b1 = (t2 - t) / (t2 - t0) * a1 + (t - t0) / (t2 - t0) * a2
        b2 = (t3 - t) / (t3 - t1) * a2 + (t - t1) / (t3 - t1) * a3
        out.append((t2 - t) / (t2 - t1) * b1 + (t - t1) / (t2 - t1) * b2)
    out.append(p[-1:])
    dense = np.concatenate(out)
    seg = np.linalg.norm(np.diff(dense, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(math.ceil(s[-1] / step)) + 1)
    q = np.linspace(0.0, s[-1], n)
    return np.stack([np.interp(q, s, dense[:, k]) for k in range(3)], axis=1)


def _tortuous(ctrl, rng, tort):
    """Insert random knots between control points: perpendicular wiggles scaled by ``tort``."""
    ctrl = [np.asarray(c, float) for c in ctrl]
    out = [ctrl[0]]
    for a, b in zip(ctrl[:-1], ctrl[1:]):
        d = b - a
        length = np.linalg.norm(d)
        k = int(length // 9.0)
        if k > 0 and tort > 0:
            u = d / (length + 1e-9)
            for f in (np.arange(1, k + 1) / (k + 1)):
                w = rng.normal(size=3)
                w -= u * (w @ u)
                amp = tort * min(0.09 * length, 3.5)
                out.append(a + f * d + amp * w / math.sqrt(2))
        out.append(b)
    return out


class Vessel:
    def __init__(self, name, cls, path, r0, r1, c_scale=1.0, artery=True):
        self.name, self.cls, self.path = name, cls, path
        self.r = np.linspace(r0, r1, len(path))
        self.c_scale = c_scale
        self.artery = artery      # veins are drawn but left out of the vessel mask
        self.dist0 = 0.0          # inflow path length at the start


def sample_anatomy(rng):
    """Head-frame landmarks, vessels, segment presence and aneurysms for one subject."""
    scale = rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, size=3)
    jit = rng.uniform(3.0, 6.0)          # RMS jitter per point, mm
    tort = rng.uniform(0.2, 1.6)         # tortuosity (age-like)

    def jitter(n=3):
        return rng.normal(size=n) * jit / math.sqrt(3)

    nodes = {}
    for name, p in anatomy.TEMPLATE.items():
        nodes[name] = p * scale
    disp = {name: jitter() for name in nodes}
    disp["BA_top"] = jitter() * 0.6
    # A1/A2 junctions: common motion, ACoA of 1.5-5 mm.
    common = jitter()
    gap = rng.uniform(1.5, 5.0)
    mid = nodes["A1_A2_R"] * [0, 1, 1] + common
    sk = rng.normal(size=3) * [0.3, 1.0, 0.8]
    pos = {n: nodes[n] + disp[n] for n in nodes}
    pos["A1_A2_R"] = mid + np.array([gap / 2, 0, 0]) + sk
    pos["A1_A2_L"] = mid - np.array([gap / 2, 0, 0]) - sk
    # Keep the ICA ordering sane: PCoA origin between prox and terminus along z.
    for s in "RL":
        lo, hi = pos[f"ICA_prox_{s}"][2], pos[f"ICA_term_{s}"][2]
        if not lo + 3 < pos[f"ICA_PCoA_{s}"][2] < hi - 1.5:
            pos[f"ICA_PCoA_{s}"][2] = lo + rng.uniform(0.45, 0.75) * (hi - lo)
        if hi - lo < 8:
            pos[f"ICA_prox_{s}"][2] = hi - rng.uniform(9, 16)

    def mirror(p, side):
        p = np.asarray(p, float) * scale
        return p * [-1, 1, 1] if side == "L" else p

    def blend(a, b, via, side):
        """Via points between nodes a and b, following a linear blend of the end displacements."""
        A0, B0 = nodes[a], nodes[b]
        dA, dB = pos[a] - A0, pos[b] - B0
        out = []
        for v in via:
            v = mirror(v, side)
            f = np.clip((v - A0) @ (B0 - A0) / max((B0 - A0) @ (B0 - A0), 1e-6), 0, 1)
            out.append(v + (1 - f) * dA + f * dB + jitter() * 0.4)
        return out

    # ---- variants
    present = {s: True for s in anatomy.SEGMENTS}
    hypo = {}
    radius = {s: anatomy.RADII[s] * rng.uniform(0.75, 1.25) for s in anatomy.SEGMENTS}
    for s in "RL":
        if rng.random() < 0.14:                          # fetal PCA
            present[f"P1_{s}"] = False
            radius[f"PCoA_{s}"] = rng.uniform(0.9, 1.3)
        elif rng.random() < 0.5:
            present[f"PCoA_{s}"] = False
        if rng.random() < 0.06:
            present[f"A1_{s}"] = False
            radius[f"A1_{'L' if s == 'R' else 'R'}"] *= 1.25
    if present["A1_R"] is False and present["A1_L"] is False:
        present["A1_L"] = True
    if rng.random() < 0.08:
        present["ACoA"] = False
    if not present["A1_R"] or not present["A1_L"]:
        present["ACoA"] = True                            # one A1 feeds both A2 through the ACoA
        radius["ACoA"] = max(radius["ACoA"], rng.uniform(0.8, 1.1))
    for seg in anatomy.VARIABLE_SEGMENTS:
        if present[seg]:
            radius[seg] = max(radius[seg], 0.55)
        else:
            hypo[seg] = rng.random() < 0.55                # drawn thin (< 0.5 mm) or not at all
            radius[seg] = rng.uniform(0.25, 0.45)

    vessels = []

    def add(name, cls, ctrl, r0, r1=None, c_scale=1.0, wiggle=1.0, artery=True):
        path = catmull_rom(_tortuous(ctrl, rng, tort * wiggle), 0.25)
        v = Vessel(name, cls, path, r0, r0 * 0.92 if r1 is None else r1, c_scale, artery)
        # Smooth calibre irregularity along the vessel (+-8 %), knots every ~8 mm.
        sarc = 0.25 * np.arange(len(path))
        knots = np.arange(0.0, sarc[-1] + 8.0, 8.0)
        v.r = v.r * (1 + 0.08 * np.interp(sarc, knots, rng.normal(size=len(knots))).clip(-2, 2))
        vessels.append(v)
        return v

    seg_cls = {s: 1 + i for i, s in enumerate(anatomy.SEGMENTS)}
    by_name = {}

    def seg(segname, a, b, via, side):
        drawn = present[segname] or hypo.get(segname, False)
        if not drawn:
            return None
        cls = seg_cls[segname] if present[segname] else 0
        r = radius[segname]
        v = add(segname, cls, [pos[a]] + blend(a, b, via, side) + [pos[b]], r)
        by_name[segname] = v
        return v

    def on(vname, frac):
        v = by_name[vname]
        return v.path[int(frac * (len(v.path) - 1))]

    # Inflow roots and lower vessels.
    ba = seg("BA", anatomy.VBJ, "BA_top", [(0.0, -5.0, -14.0)], "R")
    for s in "RL":
        root = [mirror(p, s) + jitter() * 0.7 for p in
                [(18, -12, -72), (17, -11, -46), (16, -9, -27), (15, -2, -21), (15, 8, -20),
                 (14, 14, -16)]]
        v = add(f"ICAsiphon_{s}", 0, root + [pos[f"ICA_prox_{s}"]], 2.5 * rng.uniform(0.85, 1.15),
                2.3, wiggle=0.4)
        by_name[f"ICAsiphon_{s}"] = v
        vert = [mirror(p, s) + jitter() * 0.7 for p in [(13, -24, -74), (9, -18, -52), (4, -11, -37)]]
        v = add(f"VA_{s}", 0, vert + [pos[anatomy.VBJ]], rng.uniform(0.9, 1.8))
        by_name[f"VA_{s}"] = v
    for s in "RL":
        S = lambda n: f"{n}_{s}"  # noqa: E731
        seg(S("ICA_C6"), S("ICA_prox"), S("ICA_PCoA"), _VIA["ICA_C6"], s)
        seg(S("ICA_C7"), S("ICA_PCoA"), S("ICA_term"), _VIA["ICA_C7"], s)
        seg(S("M1"), S("ICA_term"), S("M1_M2"), _VIA["M1"], s)
        seg(S("M2"), S("M1_M2"), S("M2_end"), _VIA["M2"], s)
        seg(S("A1"), S("ICA_term"), S("A1_A2"), _VIA["A1"], s)
        seg(S("A2"), S("A1_A2"), S("A2_end"), _VIA["A2"], s)
        seg(S("P1"), "BA_top", S("P1_P2"), _VIA["P1"], s)
        seg(S("P2"), S("P1_P2"), S("P2_end"), _VIA["P2"], s)
        seg(S("PCoA"), S("ICA_PCoA"), S("P1_P2"), _VIA["PCoA"], s)
    if present["ACoA"] or hypo.get("ACoA"):
        m = 0.5 * (pos["A1_A2_R"] + pos["A1_A2_L"]) + rng.normal(size=3) * [0, 0.6, 0.6]
        v = add("ACoA", seg_cls["ACoA"] if present["ACoA"] else 0,
                [pos["A1_A2_R"], m, pos["A1_A2_L"]], radius["ACoA"], wiggle=0.0)
        by_name["ACoA"] = v

    # Branches beyond the segment ends and other arteries (class 0).
    def branch(name, start, offsets, r0, r1=None, c=1.0, side="R"):
        ctrl = [start] + [start + mirror(o, side) + jitter() * 0.8 for o in offsets]
        return add(name, 0, ctrl, r0, r1, c)

    for s in "RL":
        S = lambda n: f"{n}_{s}"  # noqa: E731
        m2r = radius[S("M2")]
        branch(S("M2inf"), pos[S("M1_M2")], [(6, -3, -6), (11, -10, -3), (13, -19, 5)],
               m2r * rng.uniform(0.8, 1.05), side=s)
        if rng.random() < 0.25:   # trifurcation: a middle trunk
            branch(S("M2mid"), pos[S("M1_M2")], [(8, -2, 2), (14, -8, 8)], m2r * 0.7, side=s)
        for off in ([(3, -3, 12), (6, -10, 25)], [(5, 8, 8), (8, 16, 18)],
                    [(6, -8, 2), (10, -20, 8)])[:rng.integers(2, 4)]:
            branch(S("M3"), pos[S("M2_end")], off, m2r * rng.uniform(0.6, 0.8), side=s)
        a2r = radius[S("A2")]
        branch(S("pericallosal"), pos[S("A2_end")], [(0, 5, 8), (0, -2, 18), (0, -20, 25)],
               a2r * 0.85, side=s)
        branch(S("callosomarginal"), pos[S("A2_end")], [(2, 12, 7), (3, 14, 22)], a2r * 0.7,
               side=s)
        p2r = radius[S("P2")]
        branch(S("calcarine"), pos[S("P2_end")], [(4, -15, 3), (0, -34, 8)], p2r * 0.8, side=s)
        branch(S("PCAtemporal"), pos[S("P2_end")], [(7, -4, -7), (14, -12, -9)], p2r * 0.65,
               side=s)
        if rng.random() < 0.7:
            branch(S("parietooccipital"), pos[S("P2_end")], [(-5, -14, 10), (-6, -26, 22)],
                   p2r * 0.65, side=s)
        # Ophthalmic from the ICA at its proximal landmark, anterior choroidal from C7.
        branch(S("ophthalmic"), pos[S("ICA_prox")], [(2, 9, 0), (8, 24, 1)],
               rng.uniform(0.45, 0.7), side=s)
        if S("ICA_C7") in by_name:
            branch(S("AChA"), on(S("ICA_C7"), rng.uniform(0.4, 0.8)), [(5, -6, 0), (9, -16, 4)],
                   rng.uniform(0.3, 0.45), side=s)
        if ba is not None:
            branch(S("SCA"), on("BA", rng.uniform(0.86, 0.95)), [(5, -3, -1), (11, -9, 0),
                                                               (14, -20, 3)],
                   rng.uniform(0.55, 0.85), side=s)
            branch(S("AICA"), on("BA", rng.uniform(0.3, 0.6)), [(7, -4, -3), (14, -9, -4)],
                   rng.uniform(0.35, 0.6), side=s)
        if rng.random() < 0.8:
            branch(S("PICA"), on(S("VA"), rng.uniform(0.35, 0.6)), [(3, -9, 2), (2, -18, 8)],
                   rng.uniform(0.35, 0.6), side=s)
        if S("M1") in by_name:
            for _ in range(rng.integers(2, 6)):   # lenticulostriates
                st = on(S("M1"), rng.uniform(0.15, 0.7))
                branch(S("LSA"), st, [(rng.uniform(-3, 3), rng.uniform(-3, 3), 7),
                                      (rng.uniform(-6, 4), rng.uniform(-4, 4), 16)],
                       rng.uniform(0.22, 0.35), side=s)
    # Random small arteries from random points on existing vessels.
    parents = [v for v in vessels if v.r[0] > 0.6]
    for _ in range(rng.integers(3, 9)):
        par = parents[rng.integers(len(parents))]
        st = par.path[rng.integers(len(par.path))]
        d = _rand_unit(rng) + 0.6 * st / (np.linalg.norm(st) + 1e-6)
        d /= np.linalg.norm(d)
        length = rng.uniform(10, 30)
        ctrl = [st]
        for k in range(1, 4):
            d = d + 0.5 * _rand_unit(rng)
            d /= np.linalg.norm(d)
            ctrl.append(ctrl[-1] + d * length / 3)
        add("small", 0, ctrl, rng.uniform(0.25, 0.55), wiggle=0.5)

    # Focal stenosis on a large vessel in some cases (middle of the vessel, not at landmarks).
    if rng.random() < 0.15:
        big = [v for v in vessels if v.r.mean() > 1.0 and len(v.path) > 40]
        v = big[rng.integers(len(big))]
        sarc = 0.25 * np.arange(len(v.path))
        s0 = rng.uniform(0.3, 0.7) * sarc[-1]
        v.r = v.r * (1 - rng.uniform(0.3, 0.6) * np.exp(-((sarc - s0) / 2.0) ** 2))
    # Venous distractors with inflow signal: cavernous sinus, transverse/sigmoid sinus.
    for s in "RL":
        if rng.random() < 0.25:
            add(f"cavernous_{s}", 0, [mirror(p, s) + jitter() * 0.5 for p in
                                      [(9, 10, -22), (13, 2, -22), (15, -8, -23)]],
                rng.uniform(2.0, 3.5), c_scale=rng.uniform(0.35, 0.6), wiggle=0.2, artery=False)
        if rng.random() < 0.3:
            add(f"sigmoid_{s}", 0, [mirror(p, s) + jitter() * 0.5 for p in
                                    [(30, -95, 0), (45, -75, -12), (42, -60, -30), (35, -50, -45)]],
                rng.uniform(2.5, 4.0), c_scale=rng.uniform(0.35, 0.7), wiggle=0.2, artery=False)

    # Inflow path length: ICA/VA roots at 0, then along the tree by nearest attachment.
    done = [v for v in vessels if v.name.startswith(("ICAsiphon", "VA_"))]
    for v in done:
        v.dist0 = 0.0
    rest = [v for v in vessels if v not in done]
    for v in rest:
        best, bd = 0.0, 1e9
        for u in done:
            dd = np.linalg.norm(u.path - v.path[0], axis=1)
            i = int(np.argmin(dd))
            if dd[i] < bd:
                bd, best = dd[i], u.dist0 + 0.25 * i
        v.dist0 = best
        done.append(v)

    # Aneurysms.
    aneurysms = []
    if rng.random() < 0.3:
        sites = {"ACoA": (0.5 * (pos["A1_A2_R"] + pos["A1_A2_L"]), (0, 0.7, 0.7)),
                 "M1_M2_R": (pos["M1_M2_R"], (1, 0.2, 0.3)), "M1_M2_L": (pos["M1_M2_L"], (-1, 0.2, 0.3)),
                 "BA_top": (pos["BA_top"], (0, 0.2, 1)),
                 "ICA_PCoA_R": (pos["ICA_PCoA_R"], (0.4, -0.6, -0.4)),
                 "ICA_PCoA_L": (pos["ICA_PCoA_L"], (-0.4, -0.6, -0.4))}
        names = list(sites)
        pick = rng.choice(len(names), size=1 + int(rng.random() < 0.2), replace=False,
                          p=np.array([3, 2, 2, 1.5, 1.5, 1.5]) / 11.5)
        for i in pick:
            p, d = sites[names[i]]
            d = np.asarray(d, float) + 0.35 * rng.normal(size=3)
            d /= np.linalg.norm(d)
            r = min(rng.gamma(2.0, 0.9) + 1.0, 5.0)
            blobs = [(p + d * (0.7 * r + 0.6), r)]
            for _ in range(rng.integers(0, 3)):       # lobulation
                blobs.append((blobs[0][0] + _rand_unit(rng) * r * 0.6, r * rng.uniform(0.35, 0.6)))
            aneurysms.append({"site": names[i], "blobs": blobs, "c": rng.uniform(0.45, 0.95)})

    landmarks = np.stack([pos[n] for n in anatomy.LANDMARKS])
    return dict(landmarks=landmarks, vessels=vessels, present=present, aneurysms=aneurysms,
                scale=scale, jitter=jit, tort=tort, hypo=hypo)


# ------------------------------------------------------------------------------------- the grid

def _orientation(rng):
    """Storage direction matrix D (columns: world direction of each storage axis), acquisition
    rotation Q and the acquisition axis (0 R, 1 A, 2 S) behind each storage axis."""
    mode = rng.choice(["RAS", "LPS", "permuted", "oblique"], p=[0.3, 0.3, 0.2, 0.2])
    Q = np.eye(3)
    if mode == "RAS":
        perm, sign = [0, 1, 2], [1, 1, 1]
    elif mode == "LPS":
        perm, sign = [0, 1, 2], [-1, -1, 1]
    else:
        perm = list(rng.permutation(3))
        sign = list(rng.choice([-1, 1], size=3))
        if mode == "oblique":
            Q = _rotation(_rand_unit(rng), math.radians(rng.uniform(5, 20)))
    P = np.zeros((3, 3))
    for j in range(3):
        P[perm[j], j] = sign[j]
    return str(mode), Q @ P, Q, perm


def make_grid(rng, landmarks_world, spacing):
    mode, D, Q, perm = _orientation(rng)
    E = np.array([rng.uniform(110, 160), rng.uniform(90, 140), rng.uniform(60, 100)])
    margin = 8.0
    acq = (landmarks_world - landmarks_world.mean(0)) @ Q      # landmark coords, acquisition frame
    lo, hi = acq.min(0), acq.max(0)
    E = np.maximum(E, hi - lo + 2 * margin + 4)
    o = np.array([rng.uniform(h - e / 2 + margin, l + e / 2 - margin) for l, h, e in zip(lo, hi, E)])
    centre = landmarks_world.mean(0) + Q @ o
    sp = np.array([spacing[perm[j]] for j in range(3)])
    n = np.array([int(round(E[perm[j]] / sp[j])) for j in range(3)])
    A = np.eye(4)
    A[:3, :3] = D @ np.diag(sp)
    A[:3, 3] = centre - A[:3, :3] @ ((n - 1) / 2)
    return dict(mode=mode, affine=A, shape=tuple(int(x) for x in n), spacing=sp, Q=Q, perm=perm)


def _head_grid(landmarks_world, spacing, extent):
    n = np.round(extent / spacing).astype(int) + 1
    A = np.eye(4)
    A[:3, :3] = np.diag(spacing)
    A[:3, 3] = landmarks_world.mean(0) + np.array([0.0, -15.0, 25.0]) - spacing * (n - 1) / 2
    return dict(mode="RAS", affine=A, shape=tuple(int(x) for x in n), spacing=spacing,
                Q=np.eye(3), perm=np.arange(3))


# ------------------------------------------------------------------------------------ rendering

def render_vessels(vessels, aneurysms, to_vox, shape, sp, rng, c_params):
    """Occupancy w (max), intensity c at that maximum, vessel mask and segment labels."""
    w = np.zeros(shape, np.float32)
    cfield = np.zeros(shape, np.float32)
    mask = np.zeros(shape, bool)
    seg = np.zeros(shape, np.uint8)
    psf = 0.38 * float(np.mean(sp))
    r_min = 0.87 * float(np.mean(sp))
    base, L, floor, sat, slice_axis = c_params
    shape_a = np.array(shape)

    def splat(p_vox, r, c, cls, artery=True):
        r_eff = math.sqrt(r * r + psf * psf)
        amp = min(1.0, (r / r_eff) ** 1.5)
        h = np.ceil((1.7 * r_eff + 0.3) / sp).astype(int)
        c0 = np.floor(p_vox).astype(int)
        lo = np.maximum(c0 - h, 0)
        hi = np.minimum(c0 + h + 2, shape_a)
        if np.any(hi <= lo):
            return
        ax = [((np.arange(lo[k], hi[k]) - p_vox[k]) * sp[k]) ** 2 for k in range(3)]
        d2 = ax[0][:, None, None] + ax[1][None, :, None] + ax[2][None, None, :]
        val = amp * np.exp(-LN2 * (d2 / (r_eff * r_eff)) ** 2)
        sl = tuple(slice(lo[k], hi[k]) for k in range(3))
        cur = w[sl]
        better = val > cur
        cur[better] = val[better]
        cfield[sl][better] = c
        inside = d2 < max(r, r_min) ** 2          # sub-voxel vessels keep their centreline voxels
        if artery:
            mask[sl] |= inside
        if cls:
            seg[sl][inside] = cls

    for v in vessels:
        pv = to_vox(v.path)
        dist = v.dist0 + 0.25 * np.arange(len(v.path))
        cc = base * v.c_scale * (floor + (1 - floor) * np.exp(-dist / L))
        cc = cc * (1 + 0.04 * rng.normal())
        # In-plane flow saturates more than through-plane flow.
        tan = np.gradient(pv, axis=0) * sp
        tan /= np.linalg.norm(tan, axis=1, keepdims=True) + 1e-9
        cc = cc * (1 - sat * (1 - tan[:, slice_axis] ** 2))
        # A point every ~third of the radius is enough for a smooth tube.
        stride = max(1, int(min(v.r.min(), 1.2) / 0.25 * 0.45))
        idx = list(range(0, len(pv), stride))
        if idx[-1] != len(pv) - 1:
            idx.append(len(pv) - 1)
        for i in idx:
            splat(pv[i], float(v.r[i]), float(cc[i]), v.cls, v.artery)
    for a in aneurysms:
        for centre, r in a["blobs"]:
            # Rendered as a ball of splats (inhomogeneous slow flow inside).
            pv = to_vox(centre[None])[0]
            splat(pv, float(r), float(base * a["c"]), 0)
    return w, cfield, mask, seg


def _bspline_matrix(n, m):
    """[n, m] cubic B-spline weights taking m coarse knots to n fine samples."""
    x = (np.arange(n) + 0.5) / n * (m - 3) + 1.0            # fine samples in knot units
    d = np.abs(x[:, None] - np.arange(m)[None, :])
    w = np.where(d < 1, 2 / 3 - d ** 2 + d ** 3 / 2, np.where(d < 2, (2 - d) ** 3 / 6, 0.0))
    return w.astype(np.float32)


def _smooth_noise(rng, shape, sp, scale_mm):
    """Unit-variance smooth noise with correlation length ~scale_mm (separable B-spline)."""
    m = [max(4, int(math.ceil(n * s / scale_mm)) + 3) for n, s in zip(shape, sp)]
    out = rng.normal(size=m).astype(np.float32)
    for ax, (n, k) in enumerate(zip(shape, m)):
        out = np.moveaxis(np.tensordot(_bspline_matrix(n, k), out, axes=([1], [ax])), 0, ax)
    return out / (out.std() + 1e-6)


def _sig(x):
    return special.expit(x)


def render_background(rng, shape, head_coords, sp, scale):
    hx, hy, hz = head_coords
    s = float(np.mean(scale))
    tissue = float(rng.uniform(0.18, 0.34))
    # Head ellipsoid (brain) and shells, distances approximated in mm.
    c = [float(v) for v in np.array([0.0, -12.0, 16.0]) * s + rng.normal(size=3) * 2]
    a = [float(v) for v in np.array([66.0, 84.0, 68.0]) * s * rng.uniform(0.95, 1.05, size=3)]
    rho = np.sqrt(((hx - c[0]) / a[0]) ** 2 + ((hy - c[1]) / a[1]) ** 2 + ((hz - c[2]) / a[2]) ** 2)
    dist = (rho - 1.0) * float(np.mean(a))                  # > 0 outside the brain
    csf_t, bone_t, fat_t, skin_t = (rng.uniform(1.5, 4), rng.uniform(5, 8), rng.uniform(3, 6),
                                    rng.uniform(1, 2.5))
    img = np.full(shape, tissue, np.float32)
    # Brain texture: two scales plus sulcus-like dark sheets near the surface.
    img *= 1 + rng.uniform(0.03, 0.1) * _smooth_noise(rng, shape, sp, 18.0)
    img *= 1 + rng.uniform(0.02, 0.06) * _smooth_noise(rng, shape, sp, 4.0)
    sul = _smooth_noise(rng, shape, sp, 9.0)
    sulci = np.exp(-(sul / rng.uniform(0.08, 0.18)) ** 2)
    depth_w = _sig((dist + 18.0) / 5.0)                      # sulci mostly in the outer cortex
    img *= 1 - rng.uniform(0.15, 0.5) * sulci * depth_w
    # Dark basal cisterns around the circle.
    cis = np.sqrt((hx / (20 * s)) ** 2 + ((hy - 6 * s) / (16 * s)) ** 2 + ((hz + 2) / (9 * s)) ** 2)
    img *= 1 - rng.uniform(0.3, 0.6) * _sig((1 - cis) / 0.12)
    # Skull base: anterior fossa higher, posterior fossa deeper.
    floor = (-28.0 * s + 16.0 * s * _sig((hy - 28 * s) / 5.0) - 18.0 * s * _sig((-hy - 22 * s) / 7.0)
             + 0.002 * hx ** 2)
    below = floor - hz                                       # > 0 under the floor
    under_w = _sig(below / 1.0)
    base_tex = np.clip(0.15 + 0.25 * _smooth_noise(rng, shape, sp, 7.0), 0.02, 0.7) * tissue * 2.2
    base_val = np.where(below < 4.5, 0.03, base_tex)
    img = img * (1 - under_w) + base_val * under_w
    # Sphenoid sinus (air) and orbital fat.
    sph = np.sqrt((hx / 11.0) ** 2 + ((hy - 14 * s) / 10.0) ** 2 + ((hz + 34 * s) / 8.0) ** 2)
    img *= 1 - 0.95 * _sig((1 - sph) / 0.08)
    fat_level = tissue * float(rng.uniform(1.3, 2.1))
    for sx in (-1, 1):
        orb = np.sqrt(((hx - sx * 30 * s) / 12.0) ** 2 + ((hy - 66 * s) / 16.0) ** 2
                      + ((hz + 16 * s) / 10.0) ** 2)
        wo = _sig((1 - orb) / 0.1)
        img = img * (1 - wo) + fat_level * wo
    # Shells outside the brain: CSF, skull (with diploe), scalp fat, skin, air.
    d = dist
    csf = (d > 0) & (d <= csf_t)
    img[csf] = tissue * 0.35
    sk = (d > csf_t) & (d <= csf_t + bone_t)
    dip = np.abs(d - csf_t - bone_t / 2) < bone_t * 0.2
    img[sk] = 0.03
    img[sk & dip] = tissue * 0.6
    ft = (d > csf_t + bone_t) & (d <= csf_t + bone_t + fat_t)
    img[ft] = fat_level
    skn = (d > csf_t + bone_t + fat_t) & (d <= csf_t + bone_t + fat_t + skin_t)
    img[skn] = tissue * 1.1
    img[d > csf_t + bone_t + fat_t + skin_t] = 0.0
    return img, tissue


def generate_case(seed, index, spacing=(0.5, 0.5, 0.8), fov_mm=None):
    """One case. ``fov_mm`` (R, A, S extent): a RAS-aligned field of view of that size round the
    head (centred 15 mm behind and 25 mm above the landmarks' mean) instead of the random one;
    the same random draws, so the same subject."""
    rng = np.random.default_rng([seed, index])
    anat = sample_anatomy(rng)
    # Head pose: head frame -> world.
    R = _rotation(_rand_unit(rng), math.radians(rng.uniform(0, 12)))
    t = rng.uniform(-10, 10, size=3) + np.array([rng.uniform(-30, 30), rng.uniform(-40, 10),
                                                 rng.uniform(-20, 40)])
    lm_world = anat["landmarks"] @ R.T + t
    grid = make_grid(rng, lm_world, np.asarray(spacing, float))
    if fov_mm is not None:
        grid = _head_grid(lm_world, np.asarray(spacing, float), np.asarray(fov_mm, float))
    A = grid["affine"]
    Ainv = np.linalg.inv(A)
    shape, sp = grid["shape"], grid["spacing"]

    def to_vox(head_pts):
        w = np.asarray(head_pts) @ R.T + t
        return w @ Ainv[:3, :3].T + Ainv[:3, 3]

    # Head-frame coordinates of every voxel: head = R^T (A idx + a - t).
    M = R.T @ A[:3, :3]
    b = R.T @ (A[:3, 3] - t)
    ii = [np.arange(n, dtype=np.float32) for n in shape]
    hc = []
    for r in range(3):
        hc.append(M[r, 0] * ii[0][:, None, None] + M[r, 1] * ii[1][None, :, None]
                  + M[r, 2] * ii[2][None, None, :] + np.float32(b[r]))
    hc = [h.astype(np.float32) for h in hc]
    slice_axis = int(np.argmax(np.abs(A[2, :3])))
    bg, tissue = render_background(rng, shape, hc, sp, anat["scale"])
    del hc
    c_params = (tissue * rng.uniform(3.0, 5.5), rng.uniform(100, 300), rng.uniform(0.5, 0.75),
                rng.uniform(0.0, 0.25), slice_axis)
    w, cf, mask, seg = render_vessels(anat["vessels"], anat["aneurysms"], to_vox, shape, sp, rng,
                                      c_params)
    img = bg * (1 - w) + cf * w
    # Bias field: a few smooth cosines in world mm; multi-slab modulation along the slice axis.
    X = [np.arange(n, dtype=np.float32) * s for n, s in zip(shape, sp)]
    bias = np.zeros(shape, np.float32)
    for _ in range(3):
        k = _rand_unit(rng) * 2 * math.pi / rng.uniform(150, 400)
        ph = rng.uniform(0, 2 * math.pi)
        amp = rng.uniform(0.05, 0.18)
        bias += amp * np.cos(k[0] * X[0][:, None, None] + k[1] * X[1][None, :, None]
                             + k[2] * X[2][None, None, :] + ph).astype(np.float32)
    img *= np.exp(bias)
    if rng.random() < 0.6:
        thick = rng.uniform(18, 35)
        zz = X[slice_axis] + rng.uniform(0, thick)
        prof = 1 + rng.uniform(0.02, 0.08) * np.cos(2 * math.pi * zz / thick)
        shp = [1, 1, 1]
        shp[slice_axis] = -1
        img *= prof.reshape(shp).astype(np.float32)
    blur = rng.uniform(0.2, 0.6)
    img = ndimage.gaussian_filter(img, blur)
    snr = rng.uniform(6, 30)
    sigma = tissue / snr
    n1 = rng.normal(size=shape).astype(np.float32) * sigma
    n2 = rng.normal(size=shape).astype(np.float32) * sigma
    img = np.sqrt((img + n1) ** 2 + n2 ** 2)
    gain = rng.uniform(200, 1500)
    img = (img * gain).astype(np.float32)
    if rng.random() < 0.5:
        img = np.round(img)

    present = np.array([anat["present"][s] for s in anatomy.SEGMENTS])
    attrs = {"segments": anatomy.segment_dict(present),
             "landmarks": anatomy.landmark_dict(anatomy.landmark_attributes(present))}
    case = io.Case(f"heldout_s{seed}_{index:04d}", img, A, lm_world, mask.astype(np.uint8), seg,
                   attrs)
    meta = {"case_id": case.case_id, "orientation": grid["mode"], "shape": list(shape),
            "spacing": sp.tolist(), "snr": round(snr, 2), "jitter_mm": round(anat["jitter"], 2),
            "tortuosity": round(anat["tort"], 2), "scale": np.round(anat["scale"], 3).tolist(),
            "absent": [s for s in anatomy.VARIABLE_SEGMENTS if not anat["present"][s]],
            "aneurysms": [a["site"] for a in anat["aneurysms"]],
            "landmark_system": "RAS" if rng.random() < 0.5 else "LPS"}
    return case, meta


def _write_ras_mrk(path, landmarks_ras):
    """Slicer markups with coordinateSystem RAS (io.write_landmarks always writes LPS)."""
    pts = [{"id": str(i + 1), "label": n, "description": "", "associatedNodeID": "",
            "position": [float(v) for v in landmarks_ras[i]],
            "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
            "selected": True, "locked": False, "visibility": True, "positionStatus": "defined"}
           for i, n in enumerate(anatomy.LANDMARKS)]
    doc = {"@schema": io.SLICER_SCHEMA, "markups": [{
        "type": "Fiducial", "coordinateSystem": "RAS", "coordinateUnits": "mm", "locked": False,
        "fixedNumberOfControlPoints": False, "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": len(pts), "controlPoints": pts, "measurements": []}]}
    Path(path).write_text(json.dumps(doc, indent=2))


def save(out_dir, case, meta):
    d = Path(out_dir) / case.case_id
    io.save_case(d, case)
    if meta["landmark_system"] == "RAS":
        _write_ras_mrk(d / io.LANDMARK_FILES[0], case.landmarks)
    return d


def preview(path, case):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    A = case.affine
    vox = (case.landmarks - A[:3, 3]) @ np.linalg.inv(A[:3, :3]).T
    ax_s = int(np.argmax(np.abs(A[2, :3])))    # storage axis closest to S
    ax_a = int(np.argmax(np.abs(A[1, :3])))    # closest to A
    ax_r = int(np.argmax(np.abs(A[0, :3])))
    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    bif = case.attributes["landmarks"]
    for axp, proj, (hor, ver), title in ((axes[0], ax_s, (ax_r, ax_a), "axial MIP"),
                                         (axes[1], ax_a, (ax_r, ax_s), "coronal MIP")):
        mip = case.image.max(axis=proj)
        # mip axes are the remaining storage axes in order; arrange as [ver, hor].
        rem = [k for k in range(3) if k != proj]
        im = mip if rem[0] == ver else mip.T
        # Orient: R on the viewer's left (radiological), A/S up.
        sp = np.linalg.norm(A[:3, :3], axis=0)
        ext = [0, im.shape[1] * sp[hor], 0, im.shape[0] * sp[ver]]
        sh = np.sign(A[0 if hor == ax_r else 0, hor])
        sv = np.sign(A[1 if title == "axial MIP" else 2, ver])
        x = vox[:, hor] * sp[hor]
        y = vox[:, ver] * sp[ver]
        if sh > 0:       # increasing index goes right(R) -> flip so R is on the left
            im = im[:, ::-1]
            x = ext[1] - x
        if sv < 0:
            im = im[::-1, :]
            y = ext[3] - y
        axp.imshow(im, cmap="gray", origin="lower", extent=ext,
                   vmax=np.percentile(im, 99.7))
        for i, n in enumerate(anatomy.LANDMARKS):
            col = "lime" if bif[n] else "red"
            axp.plot(x[i], y[i], "o", ms=4, mfc="none", mec=col)
            axp.text(x[i] + 1, y[i] + 1, n, color="yellow", fontsize=5)
        axp.set_title(f"{case.case_id} {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--num", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first case index")
    ap.add_argument("--spacing", default="0.5,0.5,0.8", help="mm along R,A,S of the acquisition")
    ap.add_argument("--preview", action="store_true", help="also write previews/<case>.png")
    args = ap.parse_args(argv)
    spacing = tuple(float(v) for v in args.spacing.split(","))
    if len(spacing) != 3 or min(spacing) <= 0:
        ap.error("--spacing takes three positive numbers")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metas = []
    for i in range(args.start, args.start + args.num):
        t0 = time.time()
        case, meta = generate_case(args.seed, i, spacing)
        save(out, case, meta)
        if args.preview:
            (out / "previews").mkdir(exist_ok=True)
            preview(out / "previews" / f"{case.case_id}.png", case)
        meta["seconds"] = round(time.time() - t0, 2)
        metas.append(meta)
        print(json.dumps(meta), flush=True)
    with open(out / f"heldout_manifest_s{args.seed}.jsonl", "a") as f:
        for m in metas:
            f.write(json.dumps(m) + "\n")


if __name__ == "__main__":
    main()
