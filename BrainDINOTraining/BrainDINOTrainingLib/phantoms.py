"""A labelled phantom cohort derived from the real MNI ICBM152 2009a template.

Every subject starts from the template's real T1 texture and its grey/white-matter maps, and
gets, by documented rules (all drawn from one seeded generator per subject):

- anatomy: a smooth random deformation (±3 mm), a head-size scale (0.93-1.07), age-dependent
  atrophy (cortical grey matter turned into CSF from the surface inwards, ventricles enlarged by a
  radial deformation) with extra atrophy for the diagnosis-like class (``CN`` < ``MCI`` < ``AD``);
- contrasts: T1, T1ce, T2 and FLAIR by mapping the template's T1 intensity through per-sequence
  transfer curves anchored at the CSF / grey / white-matter intensities, so every contrast keeps
  the real anatomical texture (deep nuclei, cortex, sulci);
- tumors (60 % of subjects): an irregular lesion in white matter with mass effect and BraTS 2023
  labels (1 necrotic / non-enhancing core, 2 oedema, 3 enhancing tumor). A binary
  molecular-status-like ``marker`` (IDH-mutant-like, likelier when young) changes the appearance:
  marker 1 -> non-enhancing core, thin patchy rim, less oedema; marker 0 -> necrotic core with a
  thick enhancing rim;
- survival (tumor subjects): exponential time with hazard
  ``ln2/450 d * exp(0.8 * (V - 60 mL)/30 + 1.2 * enhancing_fraction + 0.03 * (age - 55) - 0.9 * marker)``,
  censored uniformly in 200-1500 days;
- acquisition: bias field, Rician noise, in-plane resolution (1-1.5 mm), slice thickness
  (1-5 mm), acquisition plane and on-disk orientation.

The phantoms are skull-stripped like BraTS data (background exactly 0). Anything trained on them
is a demonstration on synthetic data.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage

from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.sample_data import mni_path

logger = logging.getLogger(__name__)

SEQUENCES = ("t1", "t1ce", "t2", "flair")
DIAGNOSES = ("CN", "MCI", "AD")
MANIFEST_COLUMNS = (
    "subject_id",
    "t1",
    "t1ce",
    "t2",
    "flair",
    "seg",
    "age",
    "sex",
    "diagnosis",
    "gm_ml",
    "wm_ml",
    "csf_ml",
    "tumor",
    "ncr_ml",
    "ed_ml",
    "et_ml",
    "marker",
    "survival_days",
    "event",
    "acquisition",
    "orientation",
    "spacing_mm",
)

# Template T1 intensities of CSF, grey and white matter (medians of voxels with probability > 0.7).
_T1_ANCHORS = (0.0, 86.0, 167.0, 219.0, 255.0)
# Per-sequence intensity at those anchors (background, CSF, GM, WM, brightest WM).
_TRANSFER = {
    "t1": (0.0, 0.30, 0.62, 0.85, 0.95),
    "t1ce": (0.0, 0.34, 0.58, 0.76, 0.84),
    "t2": (0.0, 1.00, 0.55, 0.38, 0.33),
    "flair": (0.0, 0.10, 0.62, 0.45, 0.42),
}
# Tumor compartment intensities per sequence: necrosis (marker 0 core), non-enhancing core
# (marker 1 core), oedema, enhancing tumor.
_TUMOR = {
    "necrosis": {"t1": 0.22, "t1ce": 0.24, "t2": 0.95, "flair": 0.50},
    "nonenhancing": {"t1": 0.38, "t1ce": 0.40, "t2": 0.82, "flair": 0.72},
    "oedema": {"t1": 0.46, "t1ce": 0.48, "t2": 0.80, "flair": 0.92},
    "enhancing": {"t1": 0.52, "t1ce": 1.15, "t2": 0.68, "flair": 0.75},
}
_CSF_T1 = _T1_ANCHORS[1]
_ORIENTATIONS = {"axial": ("RAS", "LPS", "LAS"), "sagittal": ("PIR", "ASR"), "coronal": ("RSA", "LSP")}
_SLICE_AXIS = {"axial": 2, "sagittal": 0, "coronal": 1}


@dataclass(frozen=True)
class Template:
    """The MNI template on the cohort's base grid: T1 intensities (0-255), GM/WM probabilities, mask."""

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    tumor_sites: np.ndarray  # (N, 3) deep white-matter voxels where a tumor may be centred

    @property
    def voxel_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000

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
        t1, gm, wm, mask = maps
        t1 = np.where(mask > 0, t1 / np.maximum(mask, 1e-6), 0)  # undo partial-volume dimming at the edge
        mask = (mask > 0.5).astype(np.float32)
        sites = np.argwhere((wm > 0.9) & (ndimage.distance_transform_edt(mask) > 20 / factor))
        return cls(t1.astype(np.float32), gm, wm, mask, affine, sites)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Zero-mean, unit-std random field varying over ``scale`` voxels (smoothed coarse noise, upsampled)."""
    step = max(scale / 2, 1.0)
    coarse_shape = tuple(int(np.ceil(s / step)) + 2 for s in shape)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), 1.0, mode="wrap")
    field = ndimage.zoom(coarse, [step] * len(shape), order=1)[tuple(slice(0, s) for s in shape)]
    return (field - field.mean()) / max(float(field.std()), 1e-6)


@dataclass(frozen=True)
class SubjectPlan:
    """Everything drawn for one subject before any image is made."""

    subject_id: str
    age: float
    sex: str
    diagnosis: str
    head_scale: float
    tumor: bool
    marker: int
    acquisition: str
    orientation: str
    in_plane_mm: float
    thickness_mm: float


def plan_subject(rng: np.random.Generator, subject_id: str, tumor_fraction: float = 0.6) -> SubjectPlan:
    age = float(rng.uniform(20, 85))
    ageing = (age - 20) / 65
    p_ad, p_mci = 0.35 * ageing, 0.3 * ageing
    diagnosis = str(rng.choice(DIAGNOSES, p=[1 - p_ad - p_mci, p_mci, p_ad]))
    sex = str(rng.choice(["F", "M"]))
    head_scale = float(rng.uniform(0.93, 1.0) if sex == "F" else rng.uniform(0.97, 1.07))
    tumor = bool(rng.random() < tumor_fraction)
    marker = int(tumor and rng.random() < (0.65 if age < 45 else 0.2))
    acquisition = str(rng.choice(["axial", "axial", "sagittal", "coronal"]))
    orientation = str(rng.choice(_ORIENTATIONS[acquisition]))
    in_plane = float(rng.choice([1.0, 1.0, 1.2, 1.5]))
    thickness = (
        float(rng.choice([1.0, 2.0, 3.0, 5.0])) if acquisition == "axial" else float(rng.choice([1.0, 1.5, 2.0]))
    )
    return SubjectPlan(
        subject_id,
        round(age, 1),
        sex,
        diagnosis,
        head_scale,
        tumor,
        marker,
        acquisition,
        orientation,
        in_plane,
        thickness,
    )


def _grid(shape: tuple[int, int, int]) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))


def _radial(grid: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    offset = grid - centre[:, None, None, None]
    radius = np.sqrt((offset**2).sum(axis=0)) + 1e-3
    return offset / radius, radius


def make_subject(template: Template, plan: SubjectPlan, rng: np.random.Generator) -> dict:
    """One subject on the base grid: ``images`` (sequence -> float array), tumor ``labels`` (BraTS),
    ``tissue`` probability maps (gm, wm, csf) and their volumes ``gm_ml``, ``wm_ml``, ``csf_ml``."""
    shape = template.mask.shape
    mm = float(np.linalg.norm(template.affine[:3, 0]))
    grid = _grid(shape)
    brain = np.argwhere(template.mask > 0)
    centre = brain.mean(axis=0).astype(np.float32)
    ageing = (plan.age - 20) / 65
    extra = {"CN": 0.0, "MCI": 0.15, "AD": 0.35}[plan.diagnosis]

    # Deformation (pull-back: the subject's voxel x shows the template at x - displacement).
    displacement = np.stack([smooth_noise(rng, shape, 24 / mm) for _ in range(3)]) * (2.5 / mm)
    direction, radius = _radial(grid, centre)
    displacement += direction * radius * (plan.head_scale - 1) / plan.head_scale
    ventricles = centre + np.array([0, 10, 12]) / mm  # lateral ventricles lie above and in front of the centre
    direction, radius = _radial(grid, ventricles.astype(np.float32))
    growth = (3.0 * ageing + {"CN": 0.0, "MCI": 1.0, "AD": 3.0}[plan.diagnosis]) / mm
    displacement += direction * growth * np.clip(radius / (12 / mm), 0, 1) * np.exp(-radius / (30 / mm))

    tumor_centre = None
    if plan.tumor:
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
    del grid
    mask, t1, gm, wm = (
        ndimage.map_coordinates(v, coords, order=1, mode="constant")
        for v in (template.mask, template.t1, template.gm, template.wm)
    )
    del coords
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
    compartments = {}
    if plan.tumor:
        direction, radius = _radial(_grid(shape), tumor_centre)
        shape_noise = smooth_noise(rng, shape, 8 / mm)
        distance = radius / (tumor_radius * (1 + 0.22 * shape_noise))
        if plan.marker:
            core_edge, rim_edge, oedema_edge = 0.62, 0.62 + rng.uniform(0.0, 0.08), rng.uniform(1.15, 1.4)
            patchy = smooth_noise(rng, shape, 4 / mm) > 0.3  # marker 1: enhancement in patches only
        else:
            core_edge, rim_edge, oedema_edge = rng.uniform(0.4, 0.6), rng.uniform(0.72, 0.88), rng.uniform(1.4, 1.9)
            patchy = np.ones(shape, bool)
        oedema_edge = oedema_edge * (1 + 0.12 * smooth_noise(rng, shape, 12 / mm))  # oedema spreads unevenly
        inside = mask > 0
        core = (distance < core_edge) & inside
        enhancing = (distance >= core_edge) & (distance < rim_edge) & patchy & inside
        oedema = (distance < oedema_edge) & ~core & ~enhancing & inside
        labels[oedema], labels[core], labels[enhancing] = 2, 1, 3
        soft = lambda region: ndimage.gaussian_filter(region.astype(np.float32), 0.7 / mm)  # noqa: E731
        compartments = {
            "necrosis" if not plan.marker else "nonenhancing": soft(core),
            "oedema": soft(oedema),
            "enhancing": soft(enhancing),
        }
        tumor_total = np.clip(sum(compartments.values()), 0, 1)
        gm, wm, csf = gm * (1 - tumor_total), wm * (1 - tumor_total), csf * (1 - tumor_total)

    bias = np.exp(rng.uniform(0.04, 0.1) * smooth_noise(rng, shape, 80 / mm))
    images = {}
    for sequence in SEQUENCES:
        image = np.interp(t1, _T1_ANCHORS, _TRANSFER[sequence]).astype(np.float32)
        if compartments:
            heterogeneity = 1 + 0.08 * smooth_noise(rng, shape, 3 / mm)
            image = image * (1 - tumor_total) + sum(
                w * _TUMOR[name][sequence] * heterogeneity for name, w in compartments.items()
            )
        sigma = rng.uniform(0.01, 0.03)
        noisy = np.sqrt((image + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)
        images[sequence] = (noisy * bias * mask).astype(np.float32)
    tissue = {"gm": gm, "wm": wm, "csf": csf}
    volumes = {f"{name}_ml": float(p.sum()) * template.voxel_ml for name, p in tissue.items()}
    return {"images": images, "labels": labels, "tissue": tissue, **volumes}


def acquire(
    volume: np.ndarray, affine: np.ndarray, plan: SubjectPlan, *, labels: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Resample to the plan's in-plane resolution and slice thickness, then store in its orientation."""
    mm = float(np.linalg.norm(affine[:3, 0]))
    axis = _SLICE_AXIS[plan.acquisition]
    target = np.full(3, max(plan.in_plane_mm, mm))
    target[axis] = max(plan.thickness_mm, mm)
    zoom = mm / target
    if labels:
        resampled = ndimage.zoom(volume, zoom, order=0, grid_mode=True, mode="grid-constant")
    else:
        sigma = np.where(zoom < 1, (1 / zoom) / 2.355, 0)  # slice profile: average over the thickness
        resampled = ndimage.zoom(
            ndimage.gaussian_filter(volume, sigma), zoom, order=1, grid_mode=True, mode="grid-constant"
        )
    scale = np.array(volume.shape) / np.array(resampled.shape)
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * scale
    new_affine[:3, 3] = affine[:3, :3] @ ((scale - 1) / 2) + affine[:3, 3]
    transform = ornt_transform(axcodes2ornt(nib.aff2axcodes(new_affine)), axcodes2ornt(tuple(plan.orientation)))
    stored = apply_orientation(resampled, transform)
    return np.ascontiguousarray(stored), new_affine @ inv_ornt_aff(transform, resampled.shape)


def survival(
    rng: np.random.Generator, plan: SubjectPlan, tumor_ml: float, enhancing_fraction: float
) -> tuple[float, int]:
    hazard = (
        np.log(2)
        / 450
        * np.exp(0.8 * (tumor_ml - 60) / 30 + 1.2 * enhancing_fraction + 0.03 * (plan.age - 55) - 0.9 * plan.marker)
    )
    event_time = rng.exponential(1 / hazard)
    censor_time = rng.uniform(200, 1500)
    return round(float(min(event_time, censor_time)), 1), int(event_time <= censor_time)


def subject_rng(seed: int, index: int) -> np.random.Generator:
    """One independent generator per subject, so results do not depend on worker count or order."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def write_subject(template: Template, out_dir: Path, seed: int, index: int) -> dict:
    """Generate subject ``index`` and write its four contrasts and tumor mask; returns its manifest row."""
    rng = subject_rng(seed, index)
    plan = plan_subject(rng, f"phantom-{index:04d}")
    subject = make_subject(template, plan, rng)
    folder = out_dir / plan.subject_id
    folder.mkdir(parents=True, exist_ok=True)
    row = {"subject_id": plan.subject_id}
    scanner_gain = rng.uniform(700, 1300)
    for sequence, image in subject["images"].items():
        data, affine = acquire(image * scanner_gain, template.affine, plan)
        path = folder / f"{plan.subject_id}_{sequence}.nii.gz"
        _save(np.round(data).astype(np.int16), affine, path)
        row[sequence] = path.relative_to(out_dir).as_posix()
    seg, seg_affine = acquire(subject["labels"], template.affine, plan, labels=True)
    seg_path = folder / f"{plan.subject_id}_seg.nii.gz"
    _save(seg.astype(np.uint8), seg_affine, seg_path)
    voxel_ml = float(abs(np.linalg.det(seg_affine[:3, :3]))) / 1000
    volumes = {
        name: float((seg == label).sum()) * voxel_ml for label, name in ((1, "ncr_ml"), (2, "ed_ml"), (3, "et_ml"))
    }
    tumor_ml = sum(volumes.values())
    survival_days, event = ("", "")
    if plan.tumor:
        enhancing_fraction = volumes["et_ml"] / max(volumes["et_ml"] + volumes["ncr_ml"], 1e-6)
        survival_days, event = survival(rng, plan, tumor_ml, enhancing_fraction)
    spacing = np.linalg.norm(seg_affine[:3, :3], axis=0)
    row.update(
        seg=seg_path.relative_to(out_dir).as_posix(),
        age=plan.age,
        sex=plan.sex,
        diagnosis=plan.diagnosis,
        gm_ml=round(subject["gm_ml"], 1),
        wm_ml=round(subject["wm_ml"], 1),
        csf_ml=round(subject["csf_ml"], 1),
        tumor=int(plan.tumor),
        ncr_ml=round(volumes["ncr_ml"], 3),
        ed_ml=round(volumes["ed_ml"], 3),
        et_ml=round(volumes["et_ml"], 3),
        marker=plan.marker if plan.tumor else "",
        survival_days=survival_days,
        event=event,
        acquisition=plan.acquisition,
        orientation=plan.orientation,
        spacing_mm="x".join(f"{s:g}" for s in np.round(spacing, 3)),
    )
    return row


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    tmp = path.with_name(path.name + ".part.nii.gz")
    nib.save(image, tmp)
    tmp.replace(path)


def write_manifest(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda row: row["subject_id"]))


_WORKER_TEMPLATE: dict[float, Template] = {}


def _write_one(job: tuple[float, str, int, int]) -> dict:
    resolution, out_dir, seed, index = job
    if resolution not in _WORKER_TEMPLATE:  # loaded once per worker process
        _WORKER_TEMPLATE[resolution] = Template.load(resolution)
    return write_subject(_WORKER_TEMPLATE[resolution], Path(out_dir), seed, index)


def make_cohort(
    count: int, out_dir: str | Path, *, seed: int = 0, resolution: float = 1.0, workers: int = 1, progress=None
) -> Path:
    """Write ``count`` phantom subjects and ``manifest.csv`` to ``out_dir``; returns the manifest path.

    Deterministic by seed: subject i depends only on (seed, i), whatever ``workers`` is.

    Raises:
        BrainDINOError: bad count, or ``out_dir`` already holds a cohort.
    """
    out_dir = Path(out_dir)
    if count < 1:
        raise BrainDINOError(f"cohort size must be at least 1, got {count}")
    if (out_dir / "manifest.csv").exists():
        raise BrainDINOError(f"{out_dir}: already holds a cohort (manifest.csv); choose another folder")
    Template.load(resolution)  # fail early on a bad resolution or a missing template
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(resolution, str(out_dir), seed, i) for i in range(count)]
    rows = []
    if workers > 1 and count > 1:
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
    write_manifest(rows, out_dir / "manifest.csv")
    return out_dir / "manifest.csv"
