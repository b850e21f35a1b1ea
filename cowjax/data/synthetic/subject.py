"""What one synthetic subject has: segment radii and variants, landmark positions, pathology.

Plain data in the subject frame (RAS mm, basilar tip near the origin); ``vessels`` builds the
arteries from it and ``render`` images them.
"""

from __future__ import annotations

import numpy as np

from cowjax import anatomy

SIDES = (("R", 1.0), ("L", -1.0))


def sample_variants(rng: np.random.Generator) -> tuple[dict[str, float], dict[str, str]]:
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

    for side, _ in SIDES:
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


def sample_landmarks(rng: np.random.Generator) -> dict[str, np.ndarray]:
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


def sample_pathology(rng: np.random.Generator, lm: dict[str, np.ndarray]) -> dict:
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
