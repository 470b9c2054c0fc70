"""Model bundles: a folder with ``encoder.safetensors``, ``heads/*.safetensors`` and ``model.json``.

``model.json`` is the model card: architecture, preprocessing spec, heads, training data and
command, metrics, licence, intended use, and the sha256 of every file. Loading verifies every
hash and reads tensors with safetensors only; nothing in a bundle is ever unpickled.

Bundles are found by name in the shipped catalogue (``models/catalog.json`` next to this file),
in the user's model folder (``~/.braindino/models`` unless ``--models-dir`` says otherwise), or
by path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .brain import brain_head
from .encoder import BrainEncoder, EncoderConfig, encoder_config
from .errors import BrainDINOError, describe, from_fields, read_json
from .files import atomic_write
from .heads import HeadSpec, build_head
from .preprocess import PreprocessSpec
from .typicality import CHANNELS, NEIGHBOUR_CHANNELS, OOD_FILE, Typicality

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
CARD_FILE = "model.json"
ENCODER_FILE = "encoder.safetensors"
HEADS_DIR = "heads"
CATALOG_DIR = Path(__file__).parent / "models"
DEFAULT_MODELS_DIR = Path.home() / ".braindino" / "models"


#: How a slice embedding is read from the encoder's tokens (`EncodedVolume.slice_embeddings`).
POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class OodSettings:
    """The settings of the card's ``ood`` entry that inference reads (the rest describes the calibration)."""

    k: int
    thresholds: dict[str, float]

    def __post_init__(self):
        if self.k < 1 or set(self.thresholds) != set(CHANNELS) or min(self.thresholds.values()) <= 0:
            raise BrainDINOError(f"field 'ood' needs k >= 1 and a positive threshold for each of {', '.join(CHANNELS)}")


@dataclass(frozen=True)
class ModelCard:
    """What a bundle is, how it was made and what it may be used for (``model.json``)."""

    name: str
    description: str
    encoder: EncoderConfig
    preprocessing: PreprocessSpec
    random_init: bool
    intended_use: str
    license: str = "Apache-2.0"
    pooling: str = "cls"
    heads: tuple[HeadSpec, ...] = ()
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    ood: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.preprocessing.image_size % self.encoder.patch_size:
            raise BrainDINOError(
                f"image_size {self.preprocessing.image_size} is not a multiple of the patch size "
                f"{self.encoder.patch_size} of {self.encoder.name}"
            )
        if self.pooling not in POOLINGS:
            raise BrainDINOError(f"field 'pooling' must be one of {', '.join(POOLINGS)}")
        if self.ood:
            from_fields(OodSettings, {key: self.ood.get(key) for key in ("k", "thresholds")}, "field 'ood'")
        for spec in self.heads:
            if any(not 0 <= layer < self.encoder.depth for layer in spec.layers):
                raise BrainDINOError(
                    f"head '{spec.name}': layers {list(spec.layers)} are not blocks of a {self.encoder.depth}-block "
                    "encoder"
                )

    def to_dict(self) -> dict:
        return {"format": BUNDLE_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict, source: str) -> ModelCard:
        if not isinstance(values, dict) or values.get("format") != BUNDLE_FORMAT:
            raise BrainDINOError(f"{source}: not a BrainDINO model card of format {BUNDLE_FORMAT}")
        values = {k: v for k, v in values.items() if k != "format"}
        heads = values.pop("heads", [])
        training = values.get("training")
        if isinstance(training, dict) and "pooling" in training:  # where cards before the `pooling` field kept it
            values = {"pooling": training["pooling"], **values}
        try:  # model.json is not covered by the hashes, so every field is checked
            if not isinstance(heads, list):
                raise BrainDINOError("field 'heads' must be a list")
            specs = tuple(HeadSpec.from_dict(entry) for entry in heads)  # each named in its own errors
            return dataclasses.replace(from_fields(cls, {**values, "heads": []}, "invalid model card"), heads=specs)
        except BrainDINOError as error:
            raise BrainDINOError(f"{source}: {error}") from error


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk. Its encoder, heads and reference are read once and then shared (a cohort run
    reads the model once): callers use them, never modify them."""

    path: Path
    card: ModelCard
    _loaded: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def _once(self, key: str, build):
        if key not in self._loaded:
            self._loaded[key] = build()
        return self._loaded[key]

    def load_encoder(self) -> BrainEncoder:
        """The encoder with its weights (CPU, eval mode)."""
        return self._once(ENCODER_FILE, self._build_encoder)

    def _build_encoder(self) -> BrainEncoder:
        encoder = BrainEncoder(self.card.encoder, self.card.preprocessing.image_size, self.card.preprocessing.in_chans)
        encoder.load_weights(load_file(self.path / ENCODER_FILE), str(self.path / ENCODER_FILE))
        return encoder.eval()

    def brain_head_sha256(self) -> str | None:
        """sha256 of the brain-mask head's weights (what scans are prepared with), None without one."""
        spec = brain_head(self.card.heads)
        return self.card.files[f"{HEADS_DIR}/{spec.name}.safetensors"] if spec else None

    def load_typicality(self) -> Typicality | None:
        """The out-of-distribution reference (`braindino calibrate`), None if the bundle has none.

        Raises:
            BrainDINOError: its file is not listed (and so not hashed) in the card.
        """
        return self._once(OOD_FILE, self._build_typicality)

    def _build_typicality(self) -> Typicality | None:
        if not self.card.ood:
            return None
        if OOD_FILE not in self.card.files:  # only hashed files are read
            raise BrainDINOError(f"{self.path}: {OOD_FILE} is not listed in {CARD_FILE}")
        stored = {name: tensor.float().numpy() for name, tensor in load_file(self.path / OOD_FILE).items()}
        if "outlier_weights_0" not in stored:
            raise BrainDINOError(f"{self.path}: its out-of-distribution reference predates the current outlier "
                                 "classifier; run braindino calibrate on it again")  # fmt: skip
        layers = sum(name.startswith("outlier_weights_") for name in stored)
        return Typicality(
            references={c: stored[c] for c in NEIGHBOUR_CHANNELS},
            k=int(self.card.ood["k"]),
            outlier_layers=tuple((stored[f"outlier_weights_{i}"], stored[f"outlier_bias_{i}"]) for i in range(layers)),
            thresholds=dict(self.card.ood["thresholds"]),
        )

    def load_head(self, spec: HeadSpec) -> torch.nn.Module:
        """The head's module with its weights (CPU, eval mode).

        Raises:
            BrainDINOError: the head was fitted on other encoder weights than this bundle's.
        """
        return self._once(f"{HEADS_DIR}/{spec.name}", lambda: self._build_head(spec))

    def _build_head(self, spec: HeadSpec) -> torch.nn.Module:
        if spec.encoder_sha256 != self.card.files[ENCODER_FILE]:
            raise BrainDINOError(
                f"{self.path}: head '{spec.name}' was fitted on another encoder (sha256 "
                f"{spec.encoder_sha256[:12]}…, this bundle's is {self.card.files[ENCODER_FILE][:12]}…); "
                "fit it again on this bundle"
            )
        module = build_head(spec, self.card.encoder.embed_dim, self.card.encoder.patch_size)
        relative = f"{HEADS_DIR}/{spec.name}.safetensors"
        if relative not in self.card.files:  # only hashed files are read
            raise BrainDINOError(
                f"{self.path}: head '{spec.name}' has no verified weights ({relative} not in {CARD_FILE})"
            )
        path = self.path / relative
        try:
            module.load_state_dict(load_file(path))
        except RuntimeError as error:
            raise BrainDINOError(f"{path}: weights do not fit head '{spec.name}' ({describe(error)})") from error
        return module.eval()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_card(directory: str | Path) -> ModelCard:
    """Parse ``model.json`` of a bundle folder."""
    card_path = Path(directory) / CARD_FILE
    if not card_path.is_file():
        raise BrainDINOError(f"{directory}: not a model bundle (no {CARD_FILE})")
    values = read_json(card_path)
    return ModelCard.from_dict(values, str(card_path))


def verify_bundle(directory: str | Path) -> list[str]:
    """Problems found in a bundle (missing files, wrong hashes, unlisted weights); empty if sound."""
    directory = Path(directory)
    card = read_card(directory)
    problems = []
    if ENCODER_FILE not in card.files:
        problems.append(f"{directory}: {ENCODER_FILE} is not listed in {CARD_FILE}")
    for name, expected in card.files.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: listed in {CARD_FILE} but missing")
        elif sha256(path) != expected:
            problems.append(f"{path}: sha256 differs from {CARD_FILE} (file changed or corrupt)")
    for path in directory.rglob("*.safetensors"):
        if path.relative_to(directory).as_posix() not in card.files:
            problems.append(f"{path}: weights not listed in {CARD_FILE}")
    return problems


def load_bundle(directory: str | Path) -> Bundle:
    """Read and verify a bundle.

    Raises:
        BrainDINOError: if it is not a bundle or any file fails verification.
    """
    directory = Path(directory)
    problems = verify_bundle(directory)
    if problems:
        raise BrainDINOError(problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
    return Bundle(directory, read_card(directory))


def save_bundle(directory: str | Path, encoder: BrainEncoder, card: ModelCard, *, overwrite: bool = False) -> Bundle:
    """Write encoder weights and the card (with hashes) atomically: the folder appears complete or not at all."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise BrainDINOError(f"{directory}: already exists (choose another name or remove it)")
    if directory.exists() and not (directory / CARD_FILE).is_file():
        raise BrainDINOError(f"{directory}: exists and is not a model bundle; refusing to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in encoder.model.state_dict().items()}
        save_file(state, staging / ENCODER_FILE, metadata={"encoder": card.encoder.name})
        card = dataclasses.replace(card, files={ENCODER_FILE: sha256(staging / ENCODER_FILE)})
        (staging / CARD_FILE).write_text(_card_text(card))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Bundle(directory, card)


def add_head(directory: str | Path, spec: HeadSpec, module: torch.nn.Module) -> Bundle:
    """Store a fitted head in a bundle (replacing one of the same name); the card is rewritten atomically.

    Raises:
        BrainDINOError: ``spec.encoder_sha256`` is not this bundle's encoder.
    """
    bundle = load_bundle(directory)
    if spec.encoder_sha256 != bundle.card.files[ENCODER_FILE]:
        raise BrainDINOError(f"{directory}: head '{spec.name}' was fitted on another encoder; refusing to add it")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", spec.name):
        raise BrainDINOError(f"head name '{spec.name}' must be letters, digits, '_', '-' or '.'")
    (bundle.path / HEADS_DIR).mkdir(exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    names = [s.name for s in bundle.card.heads]
    heads = tuple(spec if s.name == spec.name else s for s in bundle.card.heads)  # a refitted head keeps its place
    heads += () if spec.name in names else (spec,)
    return _store(bundle, f"{HEADS_DIR}/{spec.name}.safetensors", weights, heads=heads)


def set_typicality(directory: str | Path, typicality: Typicality, info: dict) -> Bundle:
    """Store an out-of-distribution reference (its slices float16, the classifier float32) and its settings (``info``
    joins them in the card)."""
    bundle = load_bundle(directory)
    tensors = {c: torch.from_numpy(r).half() for c, r in typicality.references.items()}
    for i, (weights, bias) in enumerate(typicality.outlier_layers):
        tensors[f"outlier_weights_{i}"] = torch.from_numpy(weights)
        tensors[f"outlier_bias_{i}"] = torch.from_numpy(bias)
    ood = {**info, "k": typicality.k, "thresholds": typicality.thresholds}
    return _store(bundle, OOD_FILE, tensors, ood=ood)


def _store(bundle: Bundle, relative: str, tensors: dict[str, torch.Tensor], **changes) -> Bundle:
    """Write ``relative`` and the card that lists its hash (with ``changes``) as a pair (`atomic_write`): a failure
    leaves the bundle as it was, never new weights under an old card."""
    with atomic_write(bundle.path / relative, bundle.path / CARD_FILE) as (weights, card_file):
        save_file(tensors, weights)
        card = dataclasses.replace(bundle.card, files={**bundle.card.files, relative: sha256(weights)}, **changes)
        card_file.write_text(_card_text(card))
    return Bundle(bundle.path, card)


def _card_text(card: ModelCard) -> str:
    return json.dumps(card.to_dict(), indent=2) + "\n"


def create_random_bundle(
    directory: str | Path,
    encoder_name: str,
    *,
    seed: int = 0,
    preprocessing: PreprocessSpec | None = None,
    overwrite: bool = False,
) -> Bundle:
    """A bundle with a randomly initialised encoder, labelled as such: for testing pipelines only."""
    preprocessing = preprocessing or PreprocessSpec()
    config = encoder_config(encoder_name)
    torch.manual_seed(seed)
    encoder = BrainEncoder(config, preprocessing.image_size, preprocessing.in_chans)
    card = ModelCard(
        name=Path(directory).name,
        description=f"randomly initialised {config.name} (seed {seed}); no training, features carry no learned meaning",
        encoder=config,
        preprocessing=preprocessing,
        random_init=True,
        intended_use="testing and demonstrating the software only; not a trained model, "
        "not for any clinical or research conclusion",
        training={"data": "none", "seed": seed},
    )
    return save_bundle(directory, encoder, card, overwrite=overwrite)


def catalog() -> dict:
    """The shipped model catalogue (``models/catalog.json``): bundles shipped in its folder (``path``), public
    encoders that ``braindino models download`` fetches (``source``) and ones obtained by hand (``access``)."""
    return json.loads((CATALOG_DIR / "catalog.json").read_text())


def list_bundles(models_dir: Path = DEFAULT_MODELS_DIR) -> list[tuple[str, str, Path]]:
    """(name, source, path) of every shipped and user-imported (or downloaded) bundle."""
    found = [(e["name"], "shipped", CATALOG_DIR / e["path"]) for e in catalog()["models"] if "path" in e]
    if models_dir.is_dir():
        found += [(p.name, "user", p) for p in sorted(models_dir.iterdir()) if (p / CARD_FILE).is_file()]
    return found


def find_bundle(reference: str | None = None, models_dir: Path = DEFAULT_MODELS_DIR) -> Path:
    """Resolve a bundle path, a shipped or user bundle name, or None (the catalogue default)."""
    reference = reference or catalog()["default"]
    if Path(reference).is_dir():
        read_card(reference)  # a folder must be a bundle: say what is wrong with it
        return Path(reference)
    for name, _, path in list_bundles(models_dir):
        if name == reference:
            return path
    public = next((entry for entry in catalog()["models"] if entry["name"] == reference), None)
    if public and "source" in public:
        raise BrainDINOError(f"model '{reference}' is not downloaded yet: run 'braindino models download {reference}'")
    if public:
        raise BrainDINOError(f"model '{reference}' is not imported yet: {public['access']['instructions']}")
    known = ", ".join(name for name, _, _ in list_bundles(models_dir))
    raise BrainDINOError(f"no model bundle '{reference}' (a bundle folder, or one of: {known})")
