"""The head around the template brain: a tissue label map for whole-head phantoms.

The MNI template is skull-stripped, so everything outside its brain is built here, by rules, on
the template grid (MNI millimetres):

- around the brain, layers at a distance from the brain's closed surface (sulci filled): a CSF rim,
  the dura, the skull's inner table, marrow (diploe) and outer table, then the scalp (galea and the
  temporalis muscle, subcutaneous fat, skin). Each layer's thickness is drawn per subject and varies
  smoothly over the head;
- the spinal cord continues the template's brainstem downwards, so the same layers make its CSF
  sheath, dural sac and a bony canal;
- a face (orbits with eyes, lens and orbital fat; nasal cavity and maxillary sinuses filled with
  air) and a neck stump (muscle, fat, skin, the pharyngeal airway), joined to the cranium by a
  smoothed outline;
- vessels that enhance after contrast: the superior sagittal sinus and cortical veins in the CSF rim.

The labels are drawn in template space and warped with the subject's deformation and head pose,
like the brain itself. Intensities are chosen in `phantoms`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

AIR, BRAIN, CSF, DURA, BONE, MARROW, MUSCLE, FAT, SKIN, VESSEL, VITREOUS, LENS, CORD = range(13)
TISSUES = (
    "air",
    "brain",
    "csf",
    "dura",
    "bone",
    "marrow",
    "muscle",
    "fat",
    "skin",
    "vessel",
    "vitreous",
    "lens",
    "cord",
)

# Typical thickness range (mm) of each layer outward from the brain surface.
_LAYERS = (
    (CSF, (1.5, 3.5)),
    (DURA, (0.7, 1.2)),
    (BONE, (1.2, 2.2)),  # inner table
    (MARROW, (1.5, 4.5)),
    (BONE, (1.2, 2.2)),  # outer table
)
_SCALP = {"muscle": (1.0, 2.5), "fat": (2.0, 6.0), "skin": (1.5, 2.5)}
_CORD_RADIUS_MM = 5.0


def distance_outside(brain: np.ndarray, mm: float, closing_mm: float = 8.0) -> np.ndarray:
    """(X, Y, Z) float32 distance in mm from the brain's closed surface (0 inside).

    The closing (dilate then erode by ``closing_mm``, with distance transforms) fills sulci and
    fissures, so the skull follows the brain's outline, not its folds.
    """
    dilated = ndimage.distance_transform_edt(~brain) * mm <= closing_mm
    closed = ndimage.distance_transform_edt(dilated) * mm > closing_mm
    closed |= brain
    outside = ndimage.distance_transform_edt(~closed) * mm
    return np.maximum(outside - mm / 2, 0).astype(np.float32)  # from voxel centres to the surface between voxels


def spinal_cord(brain: np.ndarray, world: list[np.ndarray]) -> tuple[np.ndarray, tuple[float, float]]:
    """The cord: a tube continuing the brainstem's lowest template slice straight down to the grid's edge.

    Returns:
        (mask, (x, y)): (X, Y, Z) bool cord and its centre in MNI mm.
    """
    lowest = int(np.flatnonzero(brain.any(axis=(0, 1)))[0])
    x, y = (float(world[i][brain[:, :, lowest]].mean()) for i in (0, 1))
    below = world[2] < world[2][0, 0, lowest]
    return below & ((world[0] - x) ** 2 + (world[1] - y) ** 2 <= _CORD_RADIUS_MM**2), (x, y)


def _ellipsoid(world: list[np.ndarray], centre, axes) -> np.ndarray:
    return sum(((w - c) / a) ** 2 for w, c, a in zip(world, centre, axes, strict=True)) <= 1


def build_head(
    brain: np.ndarray,
    cord: np.ndarray,
    cord_centre: tuple[float, float],
    outside: np.ndarray,
    world: list[np.ndarray],
    mm: float,
    rng: np.random.Generator,
    noise,
    extra_csf_mm: float = 0.0,
) -> np.ndarray:
    """(X, Y, Z) uint8 tissue labels of a whole head around ``brain``.

    Args:
        brain: (X, Y, Z) bool brain mask on the template grid.
        cord, cord_centre: `spinal_cord`.
        outside: `distance_outside` of the brain and the cord.
        world: three (X, Y, Z) arrays of MNI millimetre coordinates of the voxel centres.
        mm: voxel size.
        noise: ``noise(scale_mm)`` -> zero-mean unit-std smooth random field on the grid.
        extra_csf_mm: added to the CSF rim (older brains sit in a wider CSF space).
    """
    x, y, z = world
    labels = np.zeros(brain.shape, np.uint8)

    # Cranial layers, each with a thickness that varies smoothly over the head (+-25 %).
    edge = np.zeros(brain.shape, np.float32)
    inner = {}
    for tissue, (low, high) in _LAYERS:
        thickness = rng.uniform(low, high) + (extra_csf_mm if tissue == CSF else 0.0)
        edge = edge + thickness * (1 + 0.25 * noise(40.0))
        inner.setdefault(tissue, edge.copy())
        labels[(labels == 0) & (outside < edge)] = tissue
    bone_end = edge

    # Scalp thickness, thickened over the temples by the temporalis muscle.
    muscle = rng.uniform(*_SCALP["muscle"]) * (1 + 0.3 * noise(30.0))
    temporalis = rng.uniform(4, 10) * np.exp(-(((np.abs(x) - 60) / 12) ** 2) - ((z + 5) / 25) ** 2 - (y / 45) ** 2)
    fat, skin = rng.uniform(*_SCALP["fat"]), rng.uniform(*_SCALP["skin"])
    scalp = muscle + temporalis + fat * (1 + 0.3 * noise(30.0)) + skin
    cranium = outside < bone_end + scalp

    # Face and neck: ellipsoids joined to the cranium, outline smoothed; sizes vary per subject.
    size = rng.uniform(0.92, 1.08, 3)
    face = _ellipsoid(world, (0, 40, -50), (60 * size[0], 38 * size[1], 35 * size[2]))
    face |= _ellipsoid(world, (0, 30, -92), (48 * size[0], 44 * size[1], 30 * size[2]))
    cord_y = cord_centre[1]
    neck = (((x / (55 * size[0])) ** 2 + ((y - cord_y - 10) / (55 * size[1])) ** 2) <= 1) & (z < -35)
    head = ndimage.gaussian_filter((cranium | face | neck).astype(np.float32), 3.0 / mm) > 0.5
    head |= cranium

    depth = ndimage.distance_transform_edt(head) * mm - mm / 2  # mm to the head's surface
    soft = head & (labels == 0)
    labels[soft] = MUSCLE
    labels[soft & (depth < skin + fat * (1 + 0.3 * noise(30.0)))] = FAT
    labels[soft & (depth < skin)] = SKIN

    # Vertebral bodies in front of the cord, then the air spaces of the face and neck.
    vertebrae = ((x / 14) ** 2 + ((y - cord_y - 21) / 9) ** 2 <= 1) & (z < -80) & (labels >= MUSCLE)
    labels[vertebrae] = BONE
    labels[vertebrae & ((x / 12) ** 2 + ((y - cord_y - 21) / 7) ** 2 <= 1)] = MARROW
    airway = (x**2 + ((y - cord_y - 40) / 1.3) ** 2 <= 7**2) & (z < -60)
    airway |= _ellipsoid(world, (0, cord_y + 44, -60), (10, 12, 10))  # pharynx, joining the nasal cavity
    nasal = _ellipsoid(world, (0, 48, -58), (6, 20, 18))
    sinuses = _ellipsoid(world, (24, 45, -62), (11, 13, 13)) | _ellipsoid(world, (-24, 45, -62), (11, 13, 13))
    air = ndimage.gaussian_filter((airway | nasal | sinuses).astype(np.float32), 1.5 / mm) > 0.5
    labels[air & (labels >= MUSCLE)] = AIR

    # Eyes: globe (vitreous), lens at its front, orbital fat behind, clear of the brain's coverings.
    radius = rng.uniform(11, 12.5)
    for side in (-1, 1):
        centre = np.array([side * rng.uniform(30, 34), rng.uniform(50, 56), rng.uniform(-44, -38)])
        orbit = _ellipsoid(world, centre + [0, -14, 2], (14, 20, 13)) & (labels >= BONE)
        labels[orbit] = FAT
        globe = _ellipsoid(world, centre, (radius,) * 3)
        labels[globe & (labels != DURA) & (labels != CSF)] = VITREOUS
        labels[_ellipsoid(world, centre + [0, radius - 2.5, 0], (4.5, 2.0, 4.5))] = LENS

    # Vessels that enhance: the superior sagittal sinus and cortical veins, in the CSF rim and dura.
    coverings = (labels == CSF) | (labels == DURA)
    labels[coverings & (np.abs(x) < rng.uniform(3, 4.5)) & (z > 0) & (outside > inner[CSF] - 3)] = VESSEL
    labels[(labels == CSF) & (outside > 0) & (np.abs(noise(8.0)) < 0.06)] = VESSEL

    labels[cord] = CORD
    labels[brain] = BRAIN
    return labels
