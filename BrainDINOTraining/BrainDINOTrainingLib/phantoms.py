"""A labelled phantom cohort of whole heads derived from the real MNI ICBM152 2009a template.

Every subject starts from the template's real T1 texture and its grey/white-matter maps, and
gets, by documented rules (all drawn from one seeded generator per subject):

- anatomy: a smooth random deformation (+-3 mm), a head-size scale (0.93-1.07), a head pose
  (pitch +-10 deg, roll and yaw +-5 deg), age-dependent atrophy (cortical grey matter turned into
  CSF from the surface inwards, ventricles enlarged by a radial deformation) with extra atrophy for
  the diagnosis-like class (``CN`` < ``MCI`` < ``AD``);
- a head around the brain (`head_model`): CSF rim, dura, skull tables and marrow, scalp with
  temporalis muscle and subcutaneous fat, eyes and orbits, sinuses, a neck stump with the cord;
- contrasts: T1, T1ce (dura and vessels enhance), T2 and FLAIR by mapping the template's T1
  intensity through per-sequence transfer curves anchored at the CSF / grey / white-matter
  intensities, so every contrast keeps the real anatomical texture, and fixed per-sequence values
  for the tissues of the head. Optionally, randomised contrasts (SynthSeg-style): every tissue,
  lesion compartment and head tissue gets a random intensity, then a random gamma, so that no
  intensity ordering can be relied on;
- lesions (60 % of subjects): a glioma (70 % of lesions: an irregular white-matter lesion with
  mass effect; a binary molecular-status-like ``marker``, likelier when young, makes it
  non-enhancing or patchily enhancing with less oedema, marker 0 gives a necrotic core and a thick
  rim) or 1-5 metastases (0.5-20 mL each at the grey-white junction: enhancing rim, necrotic centre
  when large, wide oedema), with BraTS 2023 labels (1 necrotic / non-enhancing core, 2 oedema,
  3 enhancing);
- survival (glioma subjects): exponential time with hazard
  ``ln2/450 d * exp(0.8 * (min(V, 150 mL) - 60 mL)/30 + 1.2 * enhancing_fraction + 0.03 * (age - 55) - 0.9 * marker)``
  (at least 1 day), censored uniformly in 200-1500 days;
- acquisition (`acquisition`): bias field, slice profile and resolution (in-plane 0.5-1.5 mm,
  slices 1-7 mm), axial/sagittal/coronal planes, field of view, motion ghosts, Gibbs ringing, Rician
  noise and on-disk orientation.

Every subject also gets its brain mask (the template's brain, deformed) on the images' grid. A
skull-stripped subject's images are cut to that mask, like BraTS data (background exactly 0).
Anything trained on phantoms is a demonstration on synthetic data.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.spatial.transform import Rotation

from BrainDINOLib import __version__
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.files import atomic_write
from BrainDINOLib.sample_data import mni_path

from . import head_model
from .acquisition import Acquisition, acquire, draw_artefacts, plan_acquisition

logger = logging.getLogger(__name__)

SEQUENCES = ("t1", "t1ce", "t2", "flair")
DIAGNOSES = ("CN", "MCI", "AD")
LESIONS = ("glioma", "metastases")
LABEL_COLUMNS = (
    "age",
    "sex",
    "diagnosis",
    "gm_ml",
    "wm_ml",
    "csf_ml",
    "tumor",
    "lesion",
    "lesion_count",
    "ncr_ml",
    "ed_ml",
    "et_ml",
    "marker",
    "survival_days",
    "event",
    "head",
    "acquisition",
    "orientation",
    "spacing_mm",
)
_NECK_MM = 60  # grid padding below the template, for the neck

# Template T1 intensities of CSF, grey and white matter (medians of voxels with probability > 0.7).
_T1_ANCHORS = (0.0, 86.0, 167.0, 219.0, 255.0)
# Per-sequence intensity at those anchors (background, CSF, GM, WM, brightest WM).
_TRANSFER = {
    "t1": (0.0, 0.30, 0.62, 0.85, 0.95),
    "t1ce": (0.0, 0.34, 0.58, 0.76, 0.84),
    "t2": (0.0, 1.00, 0.55, 0.38, 0.33),
    "flair": (0.0, 0.10, 0.62, 0.45, 0.42),
}
# Per-sequence intensity of the head's tissues, in `head_model` label order:
# air, brain (its edge: CSF), csf, dura, bone, marrow, muscle, fat, skin, vessel, vitreous, lens, cord.
_HEAD = {
    "t1": (0.0, 0.30, 0.30, 0.35, 0.04, 0.80, 0.45, 1.00, 0.55, 0.20, 0.28, 0.60, 0.80),
    "t1ce": (0.0, 0.34, 0.34, 0.95, 0.04, 0.80, 0.52, 1.00, 0.60, 1.15, 0.30, 0.60, 0.74),
    "t2": (0.0, 1.00, 1.00, 0.25, 0.03, 0.60, 0.28, 0.80, 0.45, 0.05, 1.00, 0.20, 0.40),
    "flair": (0.0, 0.10, 0.10, 0.30, 0.03, 0.65, 0.33, 0.85, 0.50, 0.05, 0.12, 0.35, 0.48),
}
# Lesion compartment intensities per sequence: necrosis (marker 0 core), non-enhancing core
# (marker 1 core), oedema, enhancing tumor.
_TUMOR = {
    "necrosis": {"t1": 0.22, "t1ce": 0.24, "t2": 0.95, "flair": 0.50},
    "nonenhancing": {"t1": 0.38, "t1ce": 0.40, "t2": 0.82, "flair": 0.72},
    "oedema": {"t1": 0.46, "t1ce": 0.48, "t2": 0.80, "flair": 0.92},
    "enhancing": {"t1": 0.52, "t1ce": 1.15, "t2": 0.68, "flair": 0.75},
}
_CSF_T1 = _T1_ANCHORS[1]


@dataclass(frozen=True)
class Contrast:
    """Intensities of one image: at the template's T1 anchors, per head tissue, per lesion compartment."""

    name: str
    brain: tuple[float, ...]
    head: tuple[float, ...]
    lesion: dict[str, float]
    gamma: float = 1.0

    @classmethod
    def sequence(cls, name: str) -> Contrast:
        return cls(name, _TRANSFER[name], _HEAD[name], {k: v[name] for k, v in _TUMOR.items()})

    @classmethod
    def random(cls, rng: np.random.Generator, name: str) -> Contrast:
        """Every tissue class an independent uniform intensity in [0, 1] (air stays dark), then a gamma."""
        csf, gm, wm = rng.uniform(0, 1, 3)
        brain = (0.0, csf, gm, wm, float(np.clip(wm + rng.uniform(-0.05, 0.1), 0, 1)))
        head = rng.uniform(0, 1, len(head_model.TISSUES))
        head[head_model.AIR], head[head_model.BRAIN] = 0.0, csf  # the brain's edge meets CSF
        lesion = dict(zip(_TUMOR, rng.uniform(0, 1, len(_TUMOR)).tolist(), strict=True))
        return cls(
            name, tuple(float(v) for v in brain), tuple(head.tolist()), lesion, float(np.exp(rng.normal(0, 0.3)))
        )


@dataclass(frozen=True)
class Template:
    """The MNI template on the cohort's base grid, padded below for the neck.

    Attributes:
        t1: T1 intensities (0-255) inside the brain.
        gm, wm: grey/white-matter probabilities.
        mask: brain mask (float 0/1).
        affine: voxel -> MNI mm.
        tumor_sites: (N, 3) deep white-matter voxels where a glioma may be centred.
        cord, cord_centre: the spinal cord continuing the brainstem (`head_model.spinal_cord`).
        outside: mm from the closed surface of brain and cord (`head_model.distance_outside`).
        brain_box: (2, 3) MNI mm bounds of the brain.
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    tumor_sites: np.ndarray
    cord: np.ndarray
    cord_centre: tuple[float, float]
    outside: np.ndarray
    brain_box: np.ndarray

    @property
    def voxel_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000

    @property
    def mm(self) -> float:
        return float(np.linalg.norm(self.affine[:3, 0]))

    def world(self) -> list[np.ndarray]:
        """Three (X, Y, Z) float32 arrays of the voxel centres' MNI coordinates."""
        axes = [
            np.arange(s, dtype=np.float32) * self.affine[i, i] + self.affine[i, 3]
            for i, s in enumerate(self.mask.shape)
        ]
        return list(np.meshgrid(*axes, indexing="ij", sparse=False))

    @classmethod
    def load(cls, resolution: float = 1.0) -> Template:
        """The template, averaged down by an integer ``resolution`` factor (1 = 1 mm, 2 = 2 mm)."""
        factor = int(round(resolution))
        if factor < 1 or factor != resolution:
            raise BrainDINOError(f"resolution must be a whole number of mm (1, 2, ...), got {resolution}")
        image = nib.load(mni_path("t1"))
        maps = [np.asarray(image.dataobj, dtype=np.float32)]
        maps += [np.asarray(nib.load(mni_path(kind)).dataobj, dtype=np.float32) / 255 for kind in ("gm", "wm")]
        mask = (maps[0] > 0).astype(np.float32)
        maps = [m * mask for m in maps] + [mask]
        if factor > 1:
            crop = tuple(slice(0, s - s % factor) for s in mask.shape)
            shape = tuple((s - s % factor) // factor for s in mask.shape)
            maps = [
                m[crop].reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean(axis=(1, 3, 5)) for m in maps
            ]
        affine = image.affine.copy()
        affine[:3, :3] *= factor
        affine[:3, 3] += (factor - 1) / 2  # voxel centres of the averaged blocks
        pad = _NECK_MM // factor
        maps = [np.pad(m, ((0, 0), (0, 0), (pad, 0))) for m in maps]
        affine[2, 3] -= pad * factor
        t1, gm, wm, mask = maps
        t1 = np.where(mask > 0, t1 / np.maximum(mask, 1e-6), 0)  # undo partial-volume dimming at the edge
        mask = (mask > 0.5).astype(np.float32)
        sites = np.argwhere((wm > 0.9) & (ndimage.distance_transform_edt(mask) > 20 / factor))
        brain = mask > 0
        partial = cls(t1.astype(np.float32), gm, wm, mask, affine, sites, brain, (0.0, 0.0), mask, np.zeros((2, 3)))
        world = partial.world()
        cord, cord_centre = head_model.spinal_cord(brain, world)
        outside = head_model.distance_outside(brain | cord, float(factor))
        box = np.array([[w[brain].min() for w in world], [w[brain].max() for w in world]], dtype=float)
        return cls(t1.astype(np.float32), gm, wm, mask, affine, sites, cord, cord_centre, outside, box)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std random field varying over ``scale`` voxels (smoothed coarse noise, upsampled)."""
    step = max(scale / 2, 1.0)
    coarse_shape = tuple(int(np.ceil(s / step)) + 2 for s in shape)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), 1.0, mode="wrap")
    size = tuple(int(round(c * step)) for c in coarse_shape)
    with torch.no_grad():  # trilinear upsampling; torch's is several times faster than ndimage.zoom
        fine = F.interpolate(torch.from_numpy(coarse)[None, None], size=size, mode="trilinear", align_corners=True)
    field = fine[0, 0, : shape[0], : shape[1], : shape[2]].numpy()
    return (field - field.mean()) / max(float(field.std()), 1e-6)


@dataclass(frozen=True)
class SubjectPlan:
    """Everything drawn for one subject before any image is made.

    Attributes:
        lesion: ``""`` (none), ``glioma`` or ``metastases``.
        marker: molecular-status-like class of a glioma (0 for other subjects).
        enhancing: whether a glioma enhances at all (low-grade-like gliomas do not).
        pose_deg: head rotation (pitch, roll, yaw) in degrees.
        skull_stripped: its images are cut to the brain mask.
    """

    subject_id: str
    age: float
    sex: str
    diagnosis: str
    head_scale: float
    lesion: str
    marker: int
    enhancing: bool
    pose_deg: tuple[float, float, float]
    acquisition: Acquisition
    skull_stripped: bool = False

    @property
    def tumor(self) -> bool:
        return bool(self.lesion)


@dataclass(frozen=True)
class CohortOptions:
    """What every subject of a cohort gets.

    Attributes:
        skull_stripped: share of subjects whose images are cut to the brain mask (background exactly 0), like
            BraTS (0: none, 1: all).
        random_contrasts: images per subject with randomised tissue intensities (``random1`` ...).
        tumor_fraction: share of subjects with a lesion.
        metastasis_share: share of those lesions that are metastases (the others are gliomas).
    """

    skull_stripped: float = 0.0
    random_contrasts: int = 0
    tumor_fraction: float = 0.6
    metastasis_share: float = 0.3


def plan_subject(
    rng: np.random.Generator, subject_id: str, template: Template, options: CohortOptions = CohortOptions()
) -> SubjectPlan:
    age = float(rng.uniform(20, 85))
    ageing = (age - 20) / 65
    p_ad, p_mci = 0.35 * ageing, 0.3 * ageing
    diagnosis = str(rng.choice(DIAGNOSES, p=[1 - p_ad - p_mci, p_mci, p_ad]))
    sex = str(rng.choice(["F", "M"]))
    head_scale = float(rng.uniform(0.93, 1.0) if sex == "F" else rng.uniform(0.97, 1.07))
    share = options.metastasis_share
    lesion = str(rng.choice(LESIONS, p=[1 - share, share])) if rng.random() < options.tumor_fraction else ""
    marker = int(lesion == "glioma" and rng.random() < (0.65 if age < 45 else 0.2))
    enhancing = not (marker and rng.random() < 0.4)
    pose = (float(rng.uniform(-10, 10)), float(rng.uniform(-5, 5)), float(rng.uniform(-5, 5)))
    acquisition = plan_acquisition(rng, template.brain_box, template.mm)
    stripped = bool(rng.random() < options.skull_stripped)
    return SubjectPlan(
        subject_id, round(age, 1), sex, diagnosis, head_scale, lesion, marker, enhancing, pose, acquisition, stripped
    )


def first_subject(template: Template, seed: int, wanted: Callable[[SubjectPlan], bool]) -> int:
    """The first subject index whose plan satisfies ``wanted`` (plans cost no image).

    Raises:
        BrainDINOError: none of the first 500 does.
    """
    for index in range(500):
        if wanted(plan_subject(subject_rng(seed, index), f"phantom-{index:04d}", template)):
            return index
    raise BrainDINOError(f"none of the first 500 subjects of seed {seed} fits")


def _grid(shape: tuple[int, int, int]) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))


def _radial(grid: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    offset = grid - centre[:, None, None, None]
    radius = np.sqrt((offset**2).sum(axis=0)) + 1e-3
    return offset / radius, radius


@dataclass
class Subject:
    """One subject on the base grid.

    Attributes:
        images: image name (sequence or ``randomN``) -> (X, Y, Z) float32 intensities (about 0-1).
        labels: (X, Y, Z) uint8 BraTS labels.
        brain: (X, Y, Z) float32 brain mask (soft at the edge).
        head: (X, Y, Z) uint8 `head_model` tissue labels.
        tissue: gm, wm, csf -> probability maps inside the brain.
        lesion_count: number of separate lesions.
    """

    images: dict[str, np.ndarray]
    labels: np.ndarray
    brain: np.ndarray
    head: np.ndarray
    tissue: dict[str, np.ndarray]
    lesion_count: int = 0
    volumes: dict[str, float] = field(default_factory=dict)


def make_subject(
    template: Template, plan: SubjectPlan, rng: np.random.Generator, options: CohortOptions = CohortOptions()
) -> Subject:
    """Draw one subject's anatomy, lesions and images on the base grid."""
    shape = template.mask.shape
    mm = template.mm
    grid = _grid(shape)
    brain = np.argwhere(template.mask > 0)
    centre = brain.mean(axis=0).astype(np.float32)
    ageing = (plan.age - 20) / 65
    extra = {"CN": 0.0, "MCI": 0.15, "AD": 0.35}[plan.diagnosis]

    def noise(scale_mm: float) -> np.ndarray:
        return smooth_noise(rng, shape, scale_mm / mm)

    head = head_model.build_head(
        template.mask > 0,
        template.cord,
        template.cord_centre,
        template.outside,
        template.world(),
        mm,
        rng,
        noise,
        extra_csf_mm=1.5 * ageing + 2 * extra,
    )

    # Deformation (pull-back: the subject's voxel x shows the template at x - displacement).
    displacement = np.stack([noise(24) for _ in range(3)]) * (2.5 / mm)
    direction, radius = _radial(grid, centre)
    displacement += direction * radius * (plan.head_scale - 1) / plan.head_scale
    ventricles = centre + np.array([0, 10, 12]) / mm  # lateral ventricles lie above and in front of the centre
    direction, radius = _radial(grid, ventricles.astype(np.float32))
    growth = (3.0 * ageing + {"CN": 0.0, "MCI": 1.0, "AD": 3.0}[plan.diagnosis]) / mm
    displacement += direction * growth * np.clip(radius / (12 / mm), 0, 1) * np.exp(-radius / (30 / mm))

    tumor_centre = None
    if plan.lesion == "glioma":
        tumor_centre = template.tumor_sites[rng.integers(len(template.tumor_sites))].astype(np.float32)
        tumor_radius = float(rng.uniform(12, 26)) / mm
        direction, radius = _radial(grid, tumor_centre)
        push = (
            0.35
            * tumor_radius
            * np.minimum(radius / tumor_radius, np.exp(-(radius - tumor_radius) / (1.5 * tumor_radius)))
        )
        displacement += direction * push

    coords = grid - displacement
    del grid, displacement
    rotation = Rotation.from_euler("xyz", plan.pose_deg, degrees=True).as_matrix().astype(np.float32)
    coords = np.einsum("ij,j...->i...", rotation, coords - centre[:, None, None, None]) + centre[:, None, None, None]
    mask, t1, gm, wm = (
        ndimage.map_coordinates(v, coords, order=1, mode="constant")
        for v in (template.mask, template.t1, template.gm, template.wm)
    )
    head = ndimage.map_coordinates(head, coords, order=0, mode="constant")
    del coords
    brain_weight = np.clip(mask, 0, 1).astype(np.float32)
    mask = (mask > 0.5).astype(np.float32)
    t1, gm, wm = t1 * mask, gm * mask, wm * mask

    # Cortical thinning: grey matter near the brain surface becomes CSF, deeper with age and disease.
    depth = ndimage.distance_transform_edt(mask) * mm
    loss = np.clip((2.0 + 2.5 * ageing + 6 * extra) - depth, 0, 1.5) / 1.5 * (0.35 * ageing + extra)
    lost = gm * np.clip(loss, 0, 0.9)
    gm = gm - lost
    t1 = t1 + (_CSF_T1 - t1) * np.clip(lost / np.maximum(gm + lost + wm, 1e-3), 0, 1)
    csf = np.clip(mask - gm - wm, 0, 1)

    labels = np.zeros(shape, np.uint8)
    compartments, count = {}, 0
    if plan.lesion == "glioma":
        compartments = _glioma(rng, plan, mask, tumor_centre, tumor_radius, mm, noise, labels)
        count = 1
    elif plan.lesion == "metastases":
        compartments, count = _metastases(rng, mask, gm, wm, depth, mm, noise, labels)
    tumor_total = np.clip(sum(compartments.values()), 0, 1) if compartments else 0.0
    if compartments:
        gm, wm, csf = gm * (1 - tumor_total), wm * (1 - tumor_total), csf * (1 - tumor_total)

    contrasts = [Contrast.sequence(s) for s in SEQUENCES]
    contrasts += [Contrast.random(rng, f"random{i + 1}") for i in range(options.random_contrasts)]
    bias = np.exp(rng.uniform(0.05, 0.25) * noise(80))
    texture = 1 + 0.06 * noise(5)  # tissue heterogeneity of the head, shared by all contrasts
    heterogeneity = 1 + 0.08 * noise(3) if compartments else 1.0
    images = {}
    for contrast in contrasts:
        image = np.interp(t1, _T1_ANCHORS, contrast.brain).astype(np.float32)
        if compartments:
            image = image * (1 - tumor_total) + sum(
                w * contrast.lesion[name] * heterogeneity for name, w in compartments.items()
            )
        if plan.skull_stripped:
            image = image * brain_weight
        else:
            around = np.asarray(contrast.head, np.float32)[head] * texture
            around = ndimage.gaussian_filter(around, 0.5 / mm)  # partial volume at tissue borders
            image = image * brain_weight + around * (1 - brain_weight)
        if contrast.gamma != 1:
            image = np.maximum(image, 0) ** contrast.gamma
        images[contrast.name] = (image * bias).astype(np.float32)
    tissue = {"gm": gm, "wm": wm, "csf": csf}
    volumes = {f"{name}_ml": float(p.sum()) * template.voxel_ml for name, p in tissue.items()}
    return Subject(images, labels, brain_weight, head, tissue, count, volumes)


def _glioma(rng, plan: SubjectPlan, mask, centre, radius_voxels, mm, noise, labels) -> dict[str, np.ndarray]:
    """Draw a glioma into ``labels``; returns its soft compartments (name -> (X, Y, Z) weight)."""
    shape = mask.shape
    _, radius = _radial(_grid(shape), centre)
    distance = radius / (radius_voxels * (1 + 0.22 * noise(8)))
    if plan.marker:
        core_edge, rim_edge, oedema_edge = 0.62, 0.62 + rng.uniform(0.0, 0.08), rng.uniform(1.15, 1.4)
        patchy = noise(4) > 0.3  # marker 1: enhancement in patches only
    else:
        core_edge, rim_edge, oedema_edge = rng.uniform(0.4, 0.6), rng.uniform(0.72, 0.88), rng.uniform(1.4, 1.9)
        patchy = np.ones(shape, bool)
    if not plan.enhancing:
        patchy = np.zeros(shape, bool)
    oedema_edge = oedema_edge * (1 + 0.12 * noise(12))  # oedema spreads unevenly
    inside = mask > 0
    core = (distance < core_edge) & inside
    enhancing = (distance >= core_edge) & (distance < rim_edge) & patchy & inside
    oedema = (distance < oedema_edge) & ~core & ~enhancing & inside
    labels[oedema], labels[core], labels[enhancing] = 2, 1, 3
    return {
        "necrosis" if not plan.marker else "nonenhancing": _soft(core, mm),
        "oedema": _soft(oedema, mm),
        "enhancing": _soft(enhancing, mm),
    }


def _metastases(rng, mask, gm, wm, depth, mm, noise, labels) -> tuple[dict[str, np.ndarray], int]:
    """Draw 1-5 metastases of 0.5-20 mL at the grey-white junction; returns soft compartments and count."""
    shape = mask.shape
    count = int(rng.choice([1, 1, 2, 3, 4, 5]))
    junction = np.argwhere((gm > 0.3) & (wm > 0.3) & (depth > 6))
    regions = {"necrosis": np.zeros(shape, bool), "oedema": np.zeros(shape, bool), "enhancing": np.zeros(shape, bool)}
    placed: list[tuple[np.ndarray, float]] = []
    inside = mask > 0
    for _ in range(count):
        volume_ml = float(np.exp(rng.uniform(np.log(0.5), np.log(20))))
        radius_mm = (3 * volume_ml * 1000 / (4 * np.pi)) ** (1 / 3)
        oedema_edge = float(rng.uniform(1.4, 2.6))
        for _attempt in range(50):
            centre = junction[rng.integers(len(junction))].astype(np.float32)
            if all(np.linalg.norm((centre - c) * mm) > (radius_mm + r) * 1.2 for c, r in placed):
                break
        placed.append((centre, radius_mm))
        reach = int(np.ceil(radius_mm * oedema_edge * 1.3 / mm)) + 2
        box = tuple(
            slice(max(0, int(c) - reach), min(s, int(c) + reach + 1)) for c, s in zip(centre, shape, strict=True)
        )
        local = np.stack(np.meshgrid(*[np.arange(b.start, b.stop, dtype=np.float32) for b in box], indexing="ij"))
        radius = np.sqrt(((local - centre[:, None, None, None]) ** 2).sum(axis=0)) * mm
        distance = radius / (radius_mm * (1 + 0.12 * noise(6)[box]))
        rim = rng.uniform(0.55, 0.8) if radius_mm > 6 else 0.0  # small metastases enhance solidly
        core = (distance < rim) & inside[box]
        enhancing = (distance >= rim) & (distance < 1) & inside[box]
        oedema = (distance < oedema_edge * (1 + 0.15 * noise(10)[box])) & inside[box] & (wm[box] > 0.2)
        regions["necrosis"][box] |= core
        regions["enhancing"][box] |= enhancing
        regions["oedema"][box] |= oedema
    regions["oedema"] &= ~regions["necrosis"] & ~regions["enhancing"]
    regions["necrosis"] &= ~regions["enhancing"]
    labels[regions["oedema"]], labels[regions["necrosis"]], labels[regions["enhancing"]] = 2, 1, 3
    return {name: _soft(region, mm) for name, region in regions.items()}, count


def _soft(region: np.ndarray, mm: float) -> np.ndarray:
    """A label region with a partial-volume edge (0.7 mm Gaussian)."""
    return ndimage.gaussian_filter(region.astype(np.float32), 0.7 / mm)


def survival(
    rng: np.random.Generator, plan: SubjectPlan, tumor_ml: float, enhancing_fraction: float
) -> tuple[float, int]:
    hazard = (
        np.log(2)
        / 450
        * np.exp(
            0.8 * (min(tumor_ml, 150) - 60) / 30 + 1.2 * enhancing_fraction + 0.03 * (plan.age - 55) - 0.9 * plan.marker
        )
    )
    event_time = max(rng.exponential(1 / hazard), 1.0)
    censor_time = rng.uniform(200, 1500)
    return round(float(min(event_time, censor_time)), 1), int(event_time <= censor_time)


def subject_rng(seed: int, index: int) -> np.random.Generator:
    """One independent generator per subject, so results do not depend on worker count or order."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def write_subject(
    template: Template, out_dir: Path, seed: int, index: int, options: CohortOptions = CohortOptions()
) -> dict:
    """Generate subject ``index`` and write its images, lesion labels and brain mask; returns its manifest row."""
    rng = subject_rng(seed, index)
    plan = plan_subject(rng, f"phantom-{index:04d}", template, options)
    subject = make_subject(template, plan, rng, options)
    folder = out_dir / plan.subject_id
    folder.mkdir(parents=True, exist_ok=True)
    row = {"subject_id": plan.subject_id}
    scanner_gain = rng.uniform(700, 1300)
    brain_mask = (subject.brain > 0.5).astype(np.uint8)  # sampled like the lesion labels, which lie inside it
    brain, brain_affine = acquire(brain_mask, template.affine, plan.acquisition, labels=True)
    for name, image in subject.images.items():
        data, affine = acquire(image, template.affine, plan.acquisition, artefacts=draw_artefacts(rng), rng=rng)
        if plan.skull_stripped:
            data = data * brain
        path = folder / f"{plan.subject_id}_{name}.nii.gz"
        _save(np.round(data * scanner_gain).astype(np.int16), affine, path)
        row[name] = path.relative_to(out_dir).as_posix()
    seg, seg_affine = acquire(subject.labels, template.affine, plan.acquisition, labels=True)
    row["seg"] = _save(seg.astype(np.uint8), seg_affine, folder / f"{plan.subject_id}_seg.nii.gz").relative_to(out_dir)
    mask_path = folder / f"{plan.subject_id}_brainmask.nii.gz"
    row["brain_mask"] = _save(brain, brain_affine, mask_path).relative_to(out_dir)
    voxel_ml = float(abs(np.linalg.det(seg_affine[:3, :3]))) / 1000
    volumes = {
        name: float((seg == label).sum()) * voxel_ml for label, name in ((1, "ncr_ml"), (2, "ed_ml"), (3, "et_ml"))
    }
    tumor_ml = sum(volumes.values())
    survival_days, event = ("", "")
    if plan.lesion == "glioma":
        enhancing_fraction = volumes["et_ml"] / max(volumes["et_ml"] + volumes["ncr_ml"], 1e-6)
        survival_days, event = survival(rng, plan, tumor_ml, enhancing_fraction)
    spacing = np.linalg.norm(seg_affine[:3, :3], axis=0)
    row.update(
        seg=Path(row["seg"]).as_posix(),
        brain_mask=Path(row["brain_mask"]).as_posix(),
        age=plan.age,
        sex=plan.sex,
        diagnosis=plan.diagnosis,
        gm_ml=round(subject.volumes["gm_ml"], 1),
        wm_ml=round(subject.volumes["wm_ml"], 1),
        csf_ml=round(subject.volumes["csf_ml"], 1),
        tumor=int(plan.tumor),
        lesion=plan.lesion,
        lesion_count=subject.lesion_count,
        ncr_ml=round(volumes["ncr_ml"], 3),
        ed_ml=round(volumes["ed_ml"], 3),
        et_ml=round(volumes["et_ml"], 3),
        marker=plan.marker if plan.lesion == "glioma" else "",
        survival_days=survival_days,
        event=event,
        head="skull-stripped" if plan.skull_stripped else "whole",
        acquisition=plan.acquisition.plane,
        orientation=plan.acquisition.orientation,
        spacing_mm="x".join(f"{s:g}" for s in np.round(spacing, 3)),
    )
    return row


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    tmp = path.with_name(path.name + ".part.nii.gz")
    nib.save(image, tmp)
    tmp.replace(path)
    return path


def manifest_columns(options: CohortOptions) -> tuple[str, ...]:
    randoms = tuple(f"random{i + 1}" for i in range(options.random_contrasts))
    return ("subject_id", *SEQUENCES, *randoms, "seg", "brain_mask", *LABEL_COLUMNS)


def write_manifest(rows: list[dict], path: Path, options: CohortOptions) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=manifest_columns(options))
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda row: row["subject_id"]))


_WORKER_TEMPLATE: dict[float, Template] = {}


def _write_one(job: tuple[float, str, int, int, CohortOptions]) -> dict:
    """Make one subject and record its manifest row beside its files (written last: the subject is done)."""
    resolution, out_dir, seed, index, options = job
    if resolution not in _WORKER_TEMPLATE:  # loaded once per worker process
        _WORKER_TEMPLATE[resolution] = Template.load(resolution)
    row = write_subject(_WORKER_TEMPLATE[resolution], Path(out_dir), seed, index, options)
    path = _row_path(Path(out_dir), index)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(row))
    return row


def make_cohort(
    count: int,
    out_dir: str | Path,
    *,
    seed: int = 0,
    resolution: float = 1.0,
    workers: int = 1,
    options: CohortOptions = CohortOptions(),
    progress=None,
) -> Path:
    """Write ``count`` phantom subjects and ``manifest.csv`` to ``out_dir``; returns the manifest path.

    Deterministic by seed: subject i depends only on (seed, i, options), whatever ``workers`` is. An
    interrupted run resumes in the same folder with the same settings: each finished subject leaves
    ``row.json`` and is not made again (``cohort.json`` records the settings).

    Raises:
        BrainDINOError: bad count or options, ``out_dir`` already holds a cohort, or an unfinished one made
            with other settings.
    """
    out_dir = Path(out_dir)
    if count < 1:
        raise BrainDINOError(f"cohort size must be at least 1, got {count}")
    shares = (options.tumor_fraction, options.skull_stripped, options.metastasis_share)
    if options.random_contrasts < 0 or not all(0 <= share <= 1 for share in shares):
        raise BrainDINOError(
            "random contrasts must be >= 0, the tumour, skull-stripped and metastasis shares in [0, 1]; got "
            f"{options.random_contrasts}, {shares}"
        )
    if (out_dir / "manifest.csv").exists():
        raise BrainDINOError(f"{out_dir}: already holds a cohort (manifest.csv); choose another folder")
    Template.load(resolution)  # fail early on a bad resolution or a missing template
    settings = {"seed": seed, "resolution": resolution, "options": dataclasses.asdict(options), "version": __version__}
    record = out_dir / "cohort.json"
    if record.exists() and json.loads(record.read_text()) != settings:
        raise BrainDINOError(
            f"{out_dir}: holds an unfinished cohort made with other settings ({record.read_text().strip()}); "
            "choose another folder, or the same settings to resume it"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings) + "\n")
    rows = [json.loads(p.read_text()) for i in range(count) if (p := _row_path(out_dir, i)).exists()]
    jobs = [(resolution, str(out_dir), seed, i, options) for i in range(count) if not _row_path(out_dir, i).exists()]
    if progress:
        progress(len(rows), count)
    if workers > 1 and len(jobs) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for row in pool.imap_unordered(_write_one, jobs):
                rows.append(row)
                if progress:
                    progress(len(rows), count)
    else:
        for job in jobs:
            rows.append(_write_one(job))
            if progress:
                progress(len(rows), count)
    write_manifest(rows, out_dir / "manifest.csv", options)
    return out_dir / "manifest.csv"


def _row_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"phantom-{index:04d}" / "row.json"
