"""The arteries of a synthetic subject as tubes, and their rendering on a voxel grid.

A tube is a dense polyline with a radius and a TOF signal at every point. ``build_tree`` draws
every artery of a subject (smooth tortuous centrelines from landmark to landmark, tapering radii,
variants and stenoses) in flow order. Rendering is analytic: each voxel's distance to the
centreline, relative to the local radius, gives a soft partial-volume edge. Long tubes are cut
into short chunks, each rendered only inside its own bounding box, so the cost scales with the
vessel volume rather than the image volume.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np
from scipy import interpolate, special

from cowjax import anatomy
from cowjax.data.synthetic.subject import SIDES

STEP_MM = 0.6        # centreline sampling
_CHUNK = 10          # points per rendered chunk


@dataclasses.dataclass
class Tube:
    """A vessel (or an aneurysm) to render.

    points: [K, 3] world mm; radius, signal: [K] (mm, TOF brightness of the lumen).
    label: semantic class written to the segment map (0: a vessel that is not a cow19 segment);
    -1 marks a lumen that enters the vessel mask but never changes the segment labels (aneurysms).
    """
    points: np.ndarray
    radius: np.ndarray
    signal: np.ndarray
    label: int


def curve(control: np.ndarray, rng: np.random.Generator, wiggle: float,
          step: float = STEP_MM) -> np.ndarray:
    """A smooth curve through ``control`` [n, 3] (mm) with a random low-frequency wiggle.

    The wiggle is perpendicular to the chord and vanishes at both ends, so the curve still starts
    and ends exactly on the first and last control points (the landmarks). ``wiggle`` is the
    amplitude relative to the chord length. Returns [K, 3] points about ``step`` mm apart.
    """
    control = np.asarray(control, dtype=np.float64)
    seg = np.linalg.norm(np.diff(control, axis=0), axis=1)
    u = np.concatenate([[0.0], np.cumsum(seg)])
    length = float(u[-1])
    k = min(3, len(control) - 1)
    spline = interpolate.make_interp_spline(u, control, k=k, bc_type="natural" if k == 3 else None)
    # Oversample, then resample at equal arc length.
    fine = spline(np.linspace(0.0, length, max(8, int(length / step) * 4)))
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(fine, axis=0), axis=1))])
    n = max(2, int(np.ceil(arc[-1] / step)) + 1)
    s = np.linspace(0.0, arc[-1], n)
    pts = np.stack([np.interp(s, arc, fine[:, a]) for a in range(3)], axis=1)

    chord = control[-1] - control[0]
    chord = chord / max(np.linalg.norm(chord), 1e-9)
    t = s / max(s[-1], 1e-9)
    offset = np.zeros_like(pts)
    for harmonic in (1, 2, 3):
        direction = rng.normal(size=3)
        direction -= direction.dot(chord) * chord
        direction /= max(np.linalg.norm(direction), 1e-9)
        amp = wiggle * length * rng.uniform(0.3, 1.0) / harmonic
        offset += (amp * np.sin(np.pi * t) * np.sin(harmonic * np.pi * t + rng.uniform(0, np.pi)))[:, None] * direction
    return pts + offset


def arc_length(points: np.ndarray) -> np.ndarray:
    """[K, 3] -> [K] cumulative length along the polyline (mm)."""
    return np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])


# ----------------------------------------------------------------------------------------------
# The arterial tree (subject frame mm)

def _sided(base: str, side: str) -> str:
    return f"{base}_{side}"


def _side(sx: float, x: float, y: float, z: float) -> np.ndarray:
    """An offset given for the right side, mirrored in x for the left (sx = -1)."""
    return np.array([sx * x, y, z])


class Tree:
    """Vessels in flow order, each with a dense centreline, radius, path length and flow gain."""

    def __init__(self, rng: np.random.Generator, tortuosity: float, stenoses: list[dict]):
        self.rng, self.tortuosity = rng, tortuosity
        self.stenoses = {s["segment"]: s for s in stenoses}
        self.vessels: dict[str, dict] = {}

    def add(self, name: str, control, r0: float, r1: float, label: int, parent: str | None = None,
            at: int = -1, arc0: float = 0.0, brightness: float = 1.0) -> None:
        """Add a vessel through ``control`` [n, 3]; a child starts at point ``at`` of its parent and
        inherits its path length and flow gain there."""
        pts = curve(np.asarray(control), self.rng, wiggle=0.04 * self.tortuosity)
        arc = arc_length(pts)
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
        beyond the branch point, so the landmark (the centreline branch point) is not where the
        branches visibly part. radii: (start, end) of each branch.
        """
        pts = self.vessels[parent]["points"]
        q = pts[-1]
        if self.rng.uniform() < 0.5:
            controls = [[q, *(q + np.asarray(o) + self.rng.normal(0, s, 3) for o, s in
                              zip(offsets, (1.0, 2.0, 2.0)))] for offsets in template]
        else:
            d = pts[-1] - pts[max(0, len(pts) - 1 - int(6 / STEP_MM))]
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


def build_tree(rng: np.random.Generator, lm: dict[str, np.ndarray], radius: dict[str, float],
                kind: dict[str, str], stenoses: list[dict]) -> Tree:
    """All arteries of one subject, in flow order (parents before children)."""
    tree = Tree(rng, tortuosity=rng.uniform(0.3, 1.6), stenoses=stenoses)

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
    vr = {side: rng.uniform(1.2, 1.9) for side, _ in SIDES}
    for side, sx in SIDES:
        vbj = lm[anatomy.VBJ]
        tree.add(f"vert_{side}", [vbj + _side(sx, 9, -6, -32) + j(), vbj + _side(sx, 6, -4, -15) + j(),
                                  vbj + _side(sx, 2.5, -1, -5) + j(), vbj],
                 vr[side], vr[side] * 0.95, 0, arc0=rng.uniform(0, 30))
    big = max(vr, key=vr.get)
    seg("BA", anatomy.VBJ, "BA_top", [mid(anatomy.VBJ, "BA_top", (rng.uniform(-3, 3), 1.0, 0.0))],
        f"vert_{big}")

    for side, sx in SIDES:
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

    for side, sx in SIDES:                                         # anterior circulation
        n = functools.partial(_sided, side=side)
        o = functools.partial(_side, sx)
        seg(n("A1"), n("ICA_term"), n("A1_A2"), [mid(n("ICA_term"), n("A1_A2"), (0, 2, 1))], n("ICA_C7"))
    feed = "A1_R" if kind["A1_R"] == "normal" else "A1_L"
    seg("ACoA", "A1_A2_R", "A1_A2_L", [mid("A1_A2_R", "A1_A2_L", (0, 0.4, 0.3), 0.3)], feed)
    for side, sx in SIDES:
        n = functools.partial(_sided, side=side)
        o = functools.partial(_side, sx)
        parent = n("A1") if kind[n("A1")] == "normal" else "ACoA"
        seg(n("A2"), n("A1_A2"), n("A2_end"), [mid(n("A1_A2"), n("A2_end"), (0, 1.5, -1), 0.7)], parent)
        tree.fork(n("A2"), (n("peri"), n("callosomarg")),
                  [[o(0.3, -4, 8), o(0.5, -14, 14), o(0.5, -28, 16)], [o(1, 6, 8), o(1.5, 6, 20)]],
                  [(rng.uniform(0.7, 0.9), 0.55), (rng.uniform(0.6, 0.8), 0.45)])

    for side, sx in SIDES:                                         # posterior circulation
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


# Where the cortical branches grow: the brain's ellipsoid (subject frame, ``render.background``).
BRAIN_CENTRE = np.array([0.0, -12.0, 15.0])
BRAIN_AXES = np.array([62.0, 82.0, 58.0])
# The terminal branches of the three territories, each side: MCA, ACA, PCA.
CORTICAL_ROOTS = ("M3_0", "M3_1", "M2inf", "peri", "callosomarg", "P3a", "P3b")


def grow_cortex(tree: Tree, rng: np.random.Generator) -> None:
    """Cortical branches beyond the terminal ones: the whole arterial tree a real TOF-MRA shows
    round the circle, instead of the circle almost alone.

    Each root (``CORTICAL_ROOTS``: the vessels beyond the M2, A2 and P2 ends, which the cow19
    landmarks put at their next branching, so these never branch) grows on from its end and
    sprouts one to three side branches along its length; every branch forks again (one to three
    children, 15-50 deg off the parent's direction and pulled outward, towards the cortex), each
    child 10-25 mm long and thinner than its parent, until it is thinner than 0.25 mm, leaves the
    brain or reaches this subject's depth (2-4 generations). Unlabelled (0); in the vessel mask.
    """
    depth = int(rng.integers(2, 5))
    taper = rng.uniform(0.85, 0.95)
    names = (f"cortex{k}" for k in itertools.count())

    def unit(v):
        return v / max(float(np.linalg.norm(v)), 1e-9)

    def branch(parent: str, at: int, direction, generation: int, queue: list) -> None:
        v = tree.vessels[parent]
        q, r0 = v["points"][at], float(v["radius"][at]) * rng.uniform(0.8, 0.95)
        length = rng.uniform(10, 25)
        tip = q + length * direction + rng.normal(0, 1.5, 3)
        if r0 < 0.25 or np.sum(((tip - BRAIN_CENTRE) / BRAIN_AXES) ** 2) > 1.0:
            return
        name = next(names)
        tree.add(name, [q, q + 0.5 * length * direction + rng.normal(0, 1.0, 3), tip],
                 r0, r0 * taper, 0, parent, at)
        if generation + 1 < depth:
            queue.append((name, generation + 1))

    def outward(q):
        return unit((q - BRAIN_CENTRE) / BRAIN_AXES)

    queue: list = []
    for side, _ in SIDES:
        for root in CORTICAL_ROOTS:
            name = _sided(root, side)
            if name not in tree.vessels:
                continue
            pts = tree.vessels[name]["points"]
            queue.append((name, 0))
            for _ in range(rng.integers(1, 4)):                     # side branches along it
                at = int(rng.uniform(0.3, 0.9) * (len(pts) - 1))
                d = unit(pts[min(at + 1, len(pts) - 1)] - pts[max(at - 1, 0)])
                side_dir = unit(np.cross(d, rng.normal(size=3)))
                branch(name, at, unit(np.cos(1.0) * d + np.sin(1.0) * side_dir
                                      + rng.uniform(0.2, 0.6) * outward(pts[at])), 1, queue)
    while queue:                                                    # forks at the ends
        parent, generation = queue.pop(0)
        pts = tree.vessels[parent]["points"]
        d = unit(pts[-1] - pts[max(0, len(pts) - 1 - int(5 / STEP_MM))])
        e = unit(np.cross(d, rng.normal(size=3)))
        for k in range(int(rng.choice([1, 2, 3], p=[0.15, 0.7, 0.15]))):
            angle = np.deg2rad(rng.uniform(15, 50))
            u = np.cos(angle) * d + np.sin(angle) * (e if k % 2 == 0 else -e)
            branch(parent, -1, unit(u + rng.uniform(0.2, 0.6) * outward(pts[-1])), generation,
                   queue)
            e = unit(np.cross(d, rng.normal(size=3)))


def aneurysm_vessels(pathology: dict, lm: dict[str, np.ndarray]) -> dict[str, dict]:
    """Aneurysm lumens as short tubes (neck at the site, a sphere at the dome) that label nothing."""
    out = {}
    for a in pathology["aneurysms"]:
        centre, dome = np.array(a["centre_subject"]), a["diameter_mm"] / 2
        out[f"aneurysm_{a['site']}"] = dict(
            points=np.stack([lm[a["site"]], centre, centre]), radius=np.array([0.6, 0.9, 1.0]) * dome,
            arc=np.full(3, 40.0), gain=np.full(3, a["brightness"]), label=-1)
    return out


# ----------------------------------------------------------------------------------------------
# Drawing on a voxel grid

def _chunks(tube: Tube):
    n = len(tube.points)
    if n == 1:
        yield tube.points[[0, 0]], tube.radius[[0, 0]], tube.signal[[0, 0]]
        return
    for start in range(0, n - 1, _CHUNK - 1):
        sl = slice(start, min(start + _CHUNK, n))
        yield tube.points[sl], tube.radius[sl], tube.signal[sl]


def draw(tubes: list[Tube], affine: np.ndarray, shape: tuple[int, int, int], edge_mm: float):
    """Draw tubes on the grid ``affine`` [4, 4] (voxel -> world mm), ``shape`` (X, Y, Z).

    Returns (lumen [X,Y,Z] float32: brightest partial-volume-weighted signal, occupancy [X,Y,Z]
    float32 in [0, 1], vessels [X,Y,Z] bool, segments [X,Y,Z] uint8). A voxel belongs to a vessel
    when its centre lies within max(radius, half the largest voxel side) of the centreline, so thin
    vessels still own the voxels they cross; where tubes meet, the one whose surface is farthest
    outside the voxel (smallest distance - radius) labels it, and every labelled tube keeps at
    least the voxels on the middle of its centreline.
    """
    lumen = np.zeros(shape, np.float32)
    occupancy = np.zeros(shape, np.float32)
    best = np.full(shape, np.inf, np.float32)
    segments = np.zeros(shape, np.uint8)
    vessels = np.zeros(shape, bool)
    inv = np.linalg.inv(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    half_voxel = 0.5 * float(spacing.max())
    corners = np.array(np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij")).reshape(3, -1).T
    for tube in tubes:
        for pts, rad, sig in _chunks(tube):
            pad = float(rad.max()) + 3.0 * edge_mm + half_voxel
            lo, hi = pts.min(0) - pad, pts.max(0) + pad
            box = lo + corners * (hi - lo)
            ijk = box @ inv[:3, :3].T + inv[:3, 3]
            i0 = np.maximum(np.floor(ijk.min(0)).astype(int), 0)
            i1 = np.minimum(np.ceil(ijk.max(0)).astype(int) + 1, shape)
            if np.any(i1 <= i0):
                continue
            grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(i0, i1)], indexing="ij"),
                            axis=-1).reshape(-1, 3)
            x = grid @ affine[:3, :3].T + affine[:3, 3]                       # [M, 3]
            a, ab = pts[:-1], np.diff(pts, axis=0)                            # [S, 3]
            ax = x[:, None, :] - a[None]                                      # [M, S, 3]
            t = np.clip(np.einsum("msc,sc->ms", ax, ab) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
            d2 = ((ax - t[..., None] * ab) ** 2).sum(-1)                      # [M, S]
            s = d2.argmin(1)
            rows = np.arange(len(x))
            d, ts = np.sqrt(d2[rows, s]), t[rows, s]
            r = rad[s] + ts * (rad[s + 1] - rad[s])
            g = sig[s] + ts * (sig[s + 1] - sig[s])
            occ = 0.5 * special.erfc((d - r) / (np.sqrt(2.0) * edge_mm))
            sub = tuple(slice(a, b) for a, b in zip(i0, i1))
            sub_shape = tuple(i1 - i0)
            occ = occ.reshape(sub_shape).astype(np.float32)
            lumen[sub] = np.maximum(lumen[sub], occ * g.reshape(sub_shape))
            occupancy[sub] = np.maximum(occupancy[sub], occ)
            inside = (d < np.maximum(r, half_voxel)).reshape(sub_shape)
            vessels[sub] |= inside
            if tube.label >= 0:
                score = (d - r).reshape(sub_shape).astype(np.float32)
                win = inside & (score < best[sub])
                best[sub] = np.where(win, score, best[sub])
                segments[sub] = np.where(win, np.uint8(tube.label), segments[sub])
    counts = np.bincount(segments.ravel(), minlength=256)
    for tube in tubes:
        if tube.label > 0 and counts[tube.label] == 0:
            # On a coarse grid a short thin segment (ACoA, C7) can lose every voxel to its wider
            # neighbours; it keeps the voxels nearest to the middle third of its centreline.
            n = len(tube.points)
            mid = tube.points[n // 3: max(n // 3 + 1, 2 * n // 3)]
            ijk = np.round(mid @ inv[:3, :3].T + inv[:3, 3]).astype(int)
            ijk = ijk[np.all((ijk >= 0) & (ijk < shape), axis=1)]
            segments[tuple(ijk.T)] = tube.label
            vessels[tuple(ijk.T)] = True
    return lumen, occupancy, vessels, segments
