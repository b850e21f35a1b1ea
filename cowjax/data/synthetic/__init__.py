"""Synthetic Circle of Willis TOF-MRA cases: the project's default data set.

  python -m cowjax.data.synthetic OUT_DIR --num 60 --seed 1234 [--spacing 0.513,0.513,0.8]
      [--preview] [--pathology 0.3] [--cortex]

Each case is one subject: the cow19 template jittered and scaled, smooth tortuous vessels with
tapering radii, the variants of ``shared/cow19.md`` at their population frequencies, optional
aneurysms and stenoses, then a TOF-like acquisition (inflow signal fading along the tree,
partial-volume edges, textured tissue, bright fat/marrow/sinus distractors, bias field, blur,
Rician noise, arbitrary scale) stored in a random orientation (the affine is the truth). With
``--cortex`` (``config.data.synthetic_cortex``) the arterial tree also forks on into cortical
branches beyond the M2, A2 and P2 ends, as a real TOF-MRA shows the circle among many vessels.

Labelling choices (``segments.nii.gz``): only the 20 cow19 segments get a class. Every other drawn
vessel (cavernous/petrous ICA, ophthalmic, inferior M2 trunk, lenticulostriates, anterior choroidal,
branches beyond M2/A2/P2 ends and their cortical branches, SCA, AICA, vertebrals) is 0 there and 1
in ``vessels.nii.gz``.
A hypoplastic variable segment (radius < 0.5 mm) is drawn thin and faint, counts as absent in
attributes.json and is labelled 0 like the other non-segment vessels; an absent segment is not drawn.
Aneurysm lumens are 1 in the vessel mask and never change the segment labels (background outside
the parent vessel). Each case folder also gets ``pathology.json`` (variants, aneurysms, stenoses).

Modules, in the order a case is made:

- ``subject``: segment radii and variants, landmark positions, aneurysms and stenoses (plain data).
- ``vessels``: the arteries as tubes (centrelines, radii, flow order) and their drawing on a voxel grid.
- ``render``: pose and grid, tissue, veins, arterial signal, acquisition, ``reorient``.
- ``case``: ``generate_case``, one subject through the three above.
- ``dataset``: ``generate_dataset`` (case folders, in parallel) and the command line ``main``.
"""

from cowjax.data.synthetic.case import PAPER_SPACING, generate_case
from cowjax.data.synthetic.dataset import generate_dataset, main
from cowjax.data.synthetic.render import reorient

__all__ = ["PAPER_SPACING", "generate_case", "generate_dataset", "main", "reorient"]
