"""Public encoders: the catalogue against its schema and timm's registry, and ``models download`` through the real
huggingface_hub client against a loopback server that answers as the Hub does (never the internet)."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import jsonschema
import pytest
import timm
import torch
from safetensors.torch import save_file

from BrainDINOLib.bundle import CATALOG_DIR, catalog, create_random_bundle, find_bundle, load_bundle, verify_bundle
from BrainDINOLib.cli import main
from BrainDINOLib.download import download, download_entry
from BrainDINOLib.encoder import ENCODERS
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.progress import Progress, download_progress_lines

COMMIT = "0123456789abcdef0123456789abcdef01234567"
ENTRY = {
    "name": "tiny-dinov2",
    "description": "a tiny DINOv2-style ViT/14 in timm's key layout, served by the test's loopback hub",
    "license": "Apache-2.0",
    "encoder": "vit-tiny14-dinov2",
    "source": {"repo": "timm/vit_tiny_patch14_dinov2.test", "file": "model.safetensors", "revision": "main"},
}


def _schema() -> dict:
    return json.loads((CATALOG_DIR / "catalog.schema.json").read_text())


def test_catalogue_matches_its_schema_and_timms_registry():
    """Every public entry names an architecture of ours and, offline, the repository timm's pretrained registry gives
    for that architecture, with the registry's licence."""
    jsonschema.validate(catalog(), _schema(), cls=jsonschema.Draft202012Validator)
    shipped = {entry["name"] for entry in catalog()["models"] if "path" in entry}
    assert catalog()["default"] in shipped
    published = {}
    for name in timm.list_pretrained():
        config = timm.models.get_pretrained_cfg(name)
        if config.hf_hub_id:
            published[config.hf_hub_id] = (name.split(".")[0], config.license)
    public = [entry for entry in catalog()["models"] if "path" not in entry]
    assert {entry["encoder"] for entry in public if "source" in entry} == {
        "vit-s14-dinov2", "vit-b14-dinov2", "vit-s14-reg4-dinov2", "vit-b14-reg4-dinov2"
    }  # fmt: skip
    for entry in public:
        where = entry["source"]["repo"] if "source" in entry else entry["access"]["instructions"]
        architecture, license = published[re.search(r"timm/[\w.-]*[\w]", where)[0]]
        assert ENCODERS[entry["encoder"]].timm_name == architecture, entry["name"]
        expected = "Apache-2.0" if "source" in entry else "DINOv3 License"
        assert entry["license"] == expected and license == expected.lower().replace(" ", "-"), entry["name"]
    jsonschema.validate(ENTRY, {"$defs": _schema()["$defs"], "$ref": "#/$defs/download"})


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch, tmp_path):
    """huggingface_hub as a user has it, online, with two differences: its home is a temporary folder, and any
    name lookup that is not loopback fails the test (so does the telemetry our download turns off)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for setting, value in {
        "HF_HUB_OFFLINE": False,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_CACHE": str(tmp_path / "hf-home" / "hub"),
        "HF_TOKEN_PATH": str(tmp_path / "hf-home" / "token"),
    }.items():
        monkeypatch.setattr(constants, setting, value)
    outside = []
    lookup = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if not _loopback(host):
            outside.append(host)
            raise socket.gaierror(f"the test reaches loopback addresses only, not {host}")
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    assert not outside, f"the test tried to reach {outside}"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[dict, bytes]:
    """A tiny DINOv2 as timm publishes one: its key layout, a 518-pixel (37 x 37) position embedding."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", embed_dim=96, depth=6, num_heads=3, num_classes=0)
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_file(state, path)
    return state, path.read_bytes()


class Hub(ThreadingHTTPServer):
    """The Hub's ``/<repo>/resolve/<revision>/<file>`` route for one file: HEAD and GET answer with the headers
    huggingface_hub reads (``X-Repo-Commit``, ``X-Linked-Etag`` = the file's sha256 as for an LFS file,
    ``X-Linked-Size``, ``Content-Length``); an unknown path gets the Hub's 404 for a missing entry."""

    def __init__(self, repo: str, filename: str, data: bytes):
        super().__init__(("127.0.0.1", 0), HubRequest)
        self.file = (repo, filename)
        self.data = data
        self.published = hashlib.sha256(data).hexdigest()
        self.requests: list[str] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubRequest(BaseHTTPRequestHandler):
    server: Hub

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", unquote(urlparse(self.path).path))
        if not match or (match[1], match[3]) != self.server.file:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", '"a-git-blob-sha1-of-the-lfs-pointer"')
        self.send_header("X-Linked-Etag", f'"{self.server.published}"')
        self.send_header("X-Linked-Size", str(len(self.server.data)))
        self.send_header("Content-Length", str(len(self.server.data)))
        self.end_headers()
        if body:
            self.wfile.write(self.server.data)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(weights):
    server = Hub(ENTRY["source"]["repo"], ENTRY["source"]["file"], weights[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _loopback(host) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_download_verifies_imports_and_then_works_offline(hub, weights, tmp_path, capsys):
    models = tmp_path / "models"
    (models / ".tiny-dinov2-download-killed" / "blobs").mkdir(parents=True)  # what a cancelled download leaves
    bundle = download(ENTRY, models, endpoint=hub.endpoint)
    assert bundle.path == models / "tiny-dinov2" and sorted(p.name for p in models.iterdir()) == ["tiny-dinov2"]
    assert not verify_bundle(bundle.path)
    card = load_bundle(bundle.path).card
    assert card.encoder.name == "vit-tiny14-dinov2" and card.license == "Apache-2.0" and not card.random_init
    assert card.training["source_sha256"] == hub.published
    assert card.training["source"] == {
        "repo": "timm/vit_tiny_patch14_dinov2.test",
        "file": "model.safetensors",
        "revision": "main",
        "commit": COMMIT,
        "url": f"{hub.endpoint}/timm/vit_tiny_patch14_dinov2.test/resolve/{COMMIT}/model.safetensors",
    }
    assert hub.requests[0].startswith("HEAD /timm/vit_tiny_patch14_dinov2.test/resolve/main/")
    assert f"GET /timm/vit_tiny_patch14_dinov2.test/resolve/{COMMIT}/model.safetensors" in hub.requests
    encoder = load_bundle(bundle.path).load_encoder().model.state_dict()
    assert encoder["pos_embed"].shape == (1, 1 + 16 * 16, 96)  # resampled from timm's 518-pixel grid
    for key, value in weights[0].items():
        if key != "pos_embed":
            assert torch.equal(encoder[key], value), key

    served = len(hub.requests)
    with pytest.raises(BrainDINOError, match="'tiny-dinov2' is already there .*--force downloads it again"):
        download(ENTRY, models, endpoint=hub.endpoint)
    assert len(hub.requests) == served  # refused before asking the hub

    again = download(ENTRY, models, force=True, endpoint=hub.endpoint, tqdm_class=download_progress_lines("tiny"))
    reports = [Progress.parse(line) for line in capsys.readouterr().err.splitlines() if line.startswith("[progress]")]
    megabytes = round(len(weights[1]) / 1e6)
    assert reports and reports[-1] == Progress("downloading tiny (MB)", megabytes, megabytes)
    assert len(hub.requests) > served and again.card.training["source_sha256"] == hub.published

    hub.shutdown()  # offline from here on
    assert find_bundle("tiny-dinov2", models) == bundle.path
    assert sorted(p.name for p in models.iterdir()) == ["tiny-dinov2"]


def test_a_file_whose_sha256_is_not_the_published_one_is_refused(hub, tmp_path):
    hub.published = "f" * 64
    with pytest.raises(BrainDINOError) as refused:
        download(ENTRY, tmp_path / "models", endpoint=hub.endpoint)
    message = str(refused.value)
    assert "sha256 differs from the " + "f" * 64 in message and "refusing it" in message and "\n" not in message
    assert any(request.startswith("GET ") for request in hub.requests)  # downloaded, then refused
    assert list((tmp_path / "models").iterdir()) == []  # no bundle, no partial download


def test_no_network_is_one_line_naming_the_way_round(tmp_path, capsys):
    models = tmp_path / "models"
    code = main(["models", "download", "dinov2-vits14", "--models-dir", str(models), "--endpoint", _closed_port()])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "Traceback" not in error
    assert error.startswith("braindino: error: cannot reach the Hugging Face Hub to download dinov2-vits14: ")
    assert "use 'braindino models import FILE --name dinov2-vits14'" in error
    assert list(models.iterdir()) == []


def test_models_list_and_lookups_name_what_to_do(tmp_path, capsys):
    models = tmp_path / "models"
    create_random_bundle(models / "dinov2-vits14", "vit-tiny14-dinov2")
    assert main(["models", "list", "--models-dir", str(models)]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"dinov2-vits14 +here +vit-s14-dinov2 +Apache-2.0", listing)
    assert re.search(r"dinov2-vitb14-reg4 +download +vit-b14-reg4-dinov2 +Apache-2.0 +https://huggingface.co/", listing)
    assert re.search(r"dinov3-vitb16 +access request +vit-b16-dinov3 +DINOv3 License +https://ai.meta.com/", listing)

    args = ["models", "download", "dinov2-vits14", "--models-dir", str(models), "--endpoint", _closed_port()]
    assert main(args) == 2 and "is already there" in capsys.readouterr().err
    assert main(["models", "download", "dinov3-vits16", "--models-dir", str(models)]) == 2
    assert "request access to the DINOv3 weights at https://ai.meta.com/" in capsys.readouterr().err
    with pytest.raises(BrainDINOError, match="no downloadable model 'nope' \\(one of: dinov2-vits14, dinov2-vitb14"):
        download_entry("nope")
    with pytest.raises(BrainDINOError, match="'dinov2-vitb14' is not downloaded yet: run 'braindino models download"):
        find_bundle("dinov2-vitb14", models)
    with pytest.raises(
        BrainDINOError, match="'dinov3-vitl16' is not imported yet: .*'braindino models import dinov3_vitl16_"
    ):
        find_bundle("dinov3-vitl16", models)
