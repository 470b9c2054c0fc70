"""Public encoders from the Hugging Face Hub: ``braindino models download NAME``.

A catalogue entry with a ``source`` names a repository, a safetensors file and a revision. The file is fetched by
huggingface_hub's own client (``hf_hub_download``: its retries and progress bar) into a temporary folder inside
the models folder, checked against the sha256 the Hub publishes for it, and imported (`import_checkpoint`) as the
bundle ``<models dir>/NAME``, whose card records the source (repository, file, revision and the commit it
resolved to), the licence and the sha256. From then on it is an ordinary user bundle: `find_bundle` and
``infer --bundle NAME`` use it offline.

The Hub publishes a large (LFS) file's sha256 as its ETag: ``HEAD <endpoint>/<repo>/resolve/<revision>/<file>``
answers ``X-Linked-Etag: "<sha256>"`` and ``X-Repo-Commit`` (see ``hf_hub_url``'s notes; ``get_hf_file_metadata``
reads both). The file is then downloaded at that commit, so the hash and the bytes are of one version.
BrainDINO imports huggingface_hub only here, on the download path: nothing else in it reaches the network.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from .bundle import CARD_FILE, DEFAULT_MODELS_DIR, Bundle, catalog, sha256
from .errors import BrainDINOError, describe

SHA256 = re.compile(r"[0-9a-f]{64}")


def public_encoders() -> list[dict]:
    """The catalogue's public encoders: downloadable (``source``) or obtained by hand (``access``)."""
    return [entry for entry in catalog()["models"] if "path" not in entry]


def is_present(entry: dict, models_dir: Path = DEFAULT_MODELS_DIR) -> bool:
    """Whether a public encoder has been downloaded or imported under its name."""
    return (Path(models_dir) / entry["name"] / CARD_FILE).is_file()


def download_entry(name: str) -> dict:
    """The catalogue entry that ``braindino models download NAME`` fetches.

    Raises:
        BrainDINOError: no public encoder of that name, or one that is not downloadable (the message says how to
            obtain it).
    """
    for entry in public_encoders():
        if entry["name"] == name and "source" in entry:
            return entry
        if entry["name"] == name:
            raise BrainDINOError(f"'{name}' cannot be downloaded by BrainDINO: {entry['access']['instructions']}")
    names = ", ".join(entry["name"] for entry in public_encoders() if "source" in entry)
    raise BrainDINOError(f"no downloadable model '{name}' (one of: {names})")


def download(
    entry: dict,
    models_dir: Path = DEFAULT_MODELS_DIR,
    *,
    force: bool = False,
    endpoint: str | None = None,
    tqdm_class: type | None = None,
) -> Bundle:
    """Download a catalogue entry's file, verify its sha256, and import it as the bundle ``models_dir/NAME``.

    Args:
        entry: a catalogue entry with a ``source`` (`download_entry`).
        models_dir: where the bundle goes (the temporary download folder too, removed in every case).
        force: download and import again, replacing the bundle.
        endpoint: the Hub's address, e.g. a mirror (default: huggingface_hub's, ``HF_ENDPOINT`` or huggingface.co).
        tqdm_class: the download's progress bar (default: huggingface_hub's).

    Raises:
        BrainDINOError: the bundle is there already (without ``force``); the Hub cannot be reached, does not serve
            the file, or publishes no sha256 for it; the file's sha256 is not the published one (nothing is kept).
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    from huggingface_hub.utils import httpx

    # The download is the only request: no usage data, and no agent registry lookup huggingface_hub makes for
    # its user-agent header (it reads this setting at each request; HF_HUB_DISABLE_TELEMETRY is read at import).
    constants.HF_HUB_DISABLE_TELEMETRY = True

    from .importers import import_checkpoint

    name, source = entry["name"], entry["source"]
    repo, filename, revision = source["repo"], source["file"], source["revision"]
    out_dir = Path(models_dir) / name
    if out_dir.exists() and not force:
        raise BrainDINOError(
            f"{out_dir}: '{name}' is already there (use it as --bundle {name}; --force downloads it again)"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{name}-download-*"):  # left by a download that was killed (Cancel)
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-download-", dir=out_dir.parent))
    try:
        url = hf_hub_url(repo, filename, revision=revision, endpoint=endpoint)
        metadata = get_hf_file_metadata(url, endpoint=endpoint)
        published, commit = metadata.etag or "", metadata.commit_hash
        if not SHA256.fullmatch(published):
            raise BrainDINOError(
                f"the Hugging Face Hub publishes no sha256 for {repo}/{filename} (ETag '{published}'); "
                "refusing a download that cannot be verified"
            )
        path = hf_hub_download(
            repo, filename, revision=commit, cache_dir=staging, endpoint=endpoint, tqdm_class=tqdm_class
        )
        if sha256(Path(path)) != published:
            raise BrainDINOError(
                f"{repo}/{filename}: the downloaded file's sha256 differs from the {published} that the Hugging Face "
                "Hub publishes; refusing it (nothing was kept)"
            )
        origin = {
            "repo": repo,
            "file": filename,
            "revision": revision,
            "commit": commit,
            "url": hf_hub_url(repo, filename, revision=commit, endpoint=endpoint),
        }
        return import_checkpoint(
            path, out_dir, encoder_name=entry["encoder"], overwrite=force, source=origin, license=entry["license"]
        )
    except (httpx.TransportError, OfflineModeIsEnabled, LocalEntryNotFoundError) as error:
        raise BrainDINOError(
            f"cannot reach the Hugging Face Hub to download {name}: {describe(error.__cause__ or error)}; download "
            f"{repo}/{filename} elsewhere and use 'braindino models import FILE --name {name}'"
        ) from error
    except HfHubHTTPError as error:
        raise BrainDINOError(
            f"the Hugging Face Hub did not serve {repo}/{filename} ({revision}) for {name}: {describe(error)}"
        ) from error
    except OSError as error:  # a full disk, a download cut short
        raise BrainDINOError(f"could not download {name}: {describe(error)}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
