"""Tests of dicomai.models: architectures, reference export, the TorchScript backend, registry."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from dicomai.errors import InferenceError, ModelLoadError
from dicomai.inference.findings import ModelIdentity, Task
from dicomai.models import (
    ARCHITECTURES,
    REFERENCE_MODELS,
    CamClassifier,
    ModelBackend,
    ModelRegistry,
    TorchScriptBackend,
    build_reference,
    ensure_model_file,
    export_state_dict,
    load_state_dict_compat,
    read_metadata,
)
from dicomai.models.architectures import densenet121, resnet18

RNG = np.random.default_rng(7)


def _images(b: int, h: int = 64, w: int = 64) -> np.ndarray:
    return RNG.standard_normal((b, 3, h, w)).astype(np.float32)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    for name in REFERENCE_MODELS:
        build_reference(name, out)
    return out


def _ref_path(reference_dir: Path, name: str) -> Path:
    return reference_dir / REFERENCE_MODELS[name].filename


# --------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_shapes_and_cams(arch: str) -> None:
    size = (64, 96)
    spec = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = spec.build().eval()
    with torch.no_grad():
        model.classifier.bias.normal_()
        logits, cams = model(torch.from_numpy(_images(2, *size)))
    n_labels = len(spec.labels)
    assert logits.shape == (2, n_labels)
    assert cams.shape[:2] == (2, n_labels)
    assert cams.shape[2:] == (size[0] // 32, size[1] // 32)
    torch.testing.assert_close(cams.mean(dim=(2, 3)), logits, atol=1e-5, rtol=1e-5)


def test_architecture_specs() -> None:
    assert set(ARCHITECTURES) == {"densenet121", "resnet18", "densenet169"}
    assert ARCHITECTURES["densenet121"].task is Task.CHEST_XRAY
    assert len(ARCHITECTURES["densenet121"].labels) == 14
    assert ARCHITECTURES["resnet18"].labels[0] == "any"
    assert ARCHITECTURES["densenet169"].labels == ("abnormal",)
    with pytest.raises(ValueError, match="num_classes"):
        densenet121(0)


def test_parameter_counts_match_torchvision() -> None:
    # torchvision: densenet121 7,978,856 and resnet18 11,689,512 parameters with 1000 classes.
    assert sum(p.numel() for p in densenet121(1000).parameters()) == 7_978_856
    assert sum(p.numel() for p in resnet18(1000).parameters()) == 11_689_512


def test_torchvision_style_keys() -> None:
    keys = set(densenet121(14).state_dict())
    assert "features.denseblock1.denselayer1.norm1.weight" in keys
    assert "features.transition3.conv.weight" in keys
    assert "features.norm5.running_var" in keys
    assert "classifier.weight" in keys
    keys = set(resnet18(6).state_dict())
    assert "features.layer1.0.conv1.weight" in keys
    assert "features.layer2.0.downsample.0.weight" in keys


def test_load_state_dict_compat_resnet_torchvision_keys() -> None:
    torch.manual_seed(1)
    source = resnet18(6)
    tv = {
        "module." + k.removeprefix("features.").replace("classifier.", "fc."): v
        for k, v in source.state_dict().items()
    }
    target = resnet18(6)
    report = load_state_dict_compat(target, tv)
    assert report.classifier_replaced
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_load_state_dict_compat_old_densenet_keys_and_imagenet_head() -> None:
    torch.manual_seed(2)
    source = densenet121(1000)
    old = {}
    for k, v in source.state_dict().items():
        for part in ("norm1", "norm2", "conv1", "conv2"):
            if ".denselayer" in k:
                k = k.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        old[k] = v
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    target = densenet121(14)
    head_before = target.classifier.weight.clone()
    report = load_state_dict_compat(target, old)
    assert not report.classifier_replaced  # 1000 outputs != 14 labels: keep our own head
    assert "classifier.weight" in report.skipped
    assert torch.equal(target.classifier.weight, head_before)
    name = "features.denseblock4.denselayer16.conv2.weight"
    assert torch.equal(target.state_dict()[name], source.state_dict()[name])


def test_load_state_dict_compat_chexnet_style_keys() -> None:
    # CheXNet re-implementations: DataParallel + a wrapper attribute + Sequential(Linear, Sigmoid).
    torch.manual_seed(4)
    source = densenet121(14)
    checkpoint = {}
    for k, v in source.state_dict().items():
        k = k.replace("classifier.", "classifier.0.")
        k = re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k)
        checkpoint["module.densenet121." + k] = v
    target = densenet121(14)
    assert load_state_dict_compat(target, checkpoint).classifier_replaced
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_load_state_dict_compat_rejects_other_architecture() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        load_state_dict_compat(densenet121(14), resnet18(14).state_dict())


# --------------------------------------------------------------------------- reference models


def test_reference_round_trip(reference_dir: Path) -> None:
    for name, ref in REFERENCE_MODELS.items():
        path = _ref_path(reference_dir, name)
        backend = TorchScriptBackend.load(path, name=name, version=ref.version, device="cpu")
        assert isinstance(backend, ModelBackend)
        assert backend.labels == ref.labels
        assert backend.device == "cpu"
        x = _images(3)
        probs, cams = backend.predict(x)
        assert probs.shape == (3, len(ref.labels)) and probs.dtype == np.float32
        assert ((probs >= 0) & (probs <= 1)).all()
        assert cams is not None and cams.shape == (3, len(ref.labels), 2, 2)
        assert cams.dtype == np.float32 and cams.min() >= 0 and cams.max() <= 1
        assert np.allclose(cams.reshape(3, len(ref.labels), -1).max(axis=2), 1.0)
        # The same weights as a plain nn.Module give the same probabilities.
        module = ARCHITECTURES[ref.architecture].build(len(ref.labels)).eval()
        module.load_state_dict(torch.jit.load(str(path)).state_dict())
        with torch.no_grad():
            logits, _ = module(torch.from_numpy(x))
        np.testing.assert_allclose(probs, torch.sigmoid(logits).numpy(), atol=1e-5)


def test_reference_metadata_and_identity(reference_dir: Path) -> None:
    path = _ref_path(reference_dir, "chest-xray")
    meta = read_metadata(path)
    assert meta["name"] == "chest-xray"
    assert meta["architecture"] == "densenet121"
    assert meta["task"] == "chest_xray"
    assert meta["version"] == "0.1.0-reference"
    assert meta["weights"] == "untrained-reference"
    assert "Not for diagnostic use" in meta["description"]
    assert meta["input_channels"] == 3
    assert meta["labels"][-1] == "hernia" and len(meta["labels"]) == 14
    assert meta["torch"] == torch.__version__
    assert isinstance(meta["seed"], int)
    backend = TorchScriptBackend.load(path, name="chest-xray", device="cpu")
    identity = backend.identity
    assert identity == ModelIdentity(
        name="chest-xray",
        version="0.1.0-reference",
        sha256=_sha(path),
        task=Task.CHEST_XRAY,
        architecture="densenet121",
        description=meta["description"],
    )


def test_reference_scores_are_not_degenerate(reference_dir: Path) -> None:
    path = _ref_path(reference_dir, "head-ct-ich")
    probs, _ = TorchScriptBackend.load(path, name="ct", device="cpu").predict(_images(4, 128, 128))
    assert probs.max() < 0.5  # untrained: near the 0.1 prior, below the default threshold
    assert probs.min() > 0.01


def test_same_seed_same_parameters(tmp_path: Path, reference_dir: Path) -> None:
    again = build_reference("head-ct-ich", tmp_path / "again.pt")
    other = build_reference("head-ct-ich", tmp_path / "other.pt", seed=1)
    first = torch.jit.load(str(_ref_path(reference_dir, "head-ct-ich"))).state_dict()
    second = torch.jit.load(str(again)).state_dict()
    third = torch.jit.load(str(other)).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["features.conv1.weight"], third["features.conv1.weight"])


def test_build_reference_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_reference("head-ct-ich", tmp_path / "x.pt", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_build_reference_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match='"name"'):
        build_reference("lung-ct", tmp_path / "x.pt")


# --------------------------------------------------------------------------- backend errors


def test_checksum_mismatch(reference_dir: Path) -> None:
    path = _ref_path(reference_dir, "head-ct-ich")
    with pytest.raises(ModelLoadError, match="head-ct-ich: checksum mismatch"):
        TorchScriptBackend.load(path, name="head-ct-ich", expected_sha256="0" * 64, device="cpu")
    backend = TorchScriptBackend.load(
        path, name="head-ct-ich", expected_sha256=_sha(path).upper(), device="cpu"
    )
    assert backend.identity.sha256 == _sha(path)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="m1: file not found"):
        TorchScriptBackend.load(tmp_path / "nope.pt", name="m1", device="cpu")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="m2"):
        TorchScriptBackend.load(bad, name="m2", device="cpu")
    with pytest.raises(ModelLoadError):
        read_metadata(tmp_path / "nope.pt")


def test_label_and_task_mismatch(reference_dir: Path) -> None:
    path = _ref_path(reference_dir, "head-ct-ich")
    with pytest.raises(ModelLoadError, match=r"warm-up failed: model ct: output shape \(1, 6\)"):
        TorchScriptBackend.load(path, name="ct", labels=["a", "b"], device="cpu")
    with pytest.raises(ModelLoadError, match="task"):
        TorchScriptBackend.load(path, name="ct", task="chest_xray", device="cpu")
    renamed = TorchScriptBackend.load(path, name="ct", labels=list("abcdef"), device="cpu")
    assert renamed.labels == tuple("abcdef")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda(reference_dir: Path) -> None:
    path = _ref_path(reference_dir, "head-ct-ich")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        TorchScriptBackend.load(path, name="ct", device="cuda")
    with pytest.raises(ValueError, match="device"):
        TorchScriptBackend.load(path, name="ct", device="gpu")
    auto = TorchScriptBackend.load(path, name="ct", device="auto")
    assert auto.device == "cpu"


def test_predict_checks_batch(reference_dir: Path) -> None:
    backend = TorchScriptBackend.load(_ref_path(reference_dir, "head-ct-ich"), name="ct")
    with pytest.raises(ValueError, match="channels"):
        backend.predict(np.zeros((1, 1, 64, 64), np.float32))
    with pytest.raises(ValueError, match="shape"):
        backend.predict(np.zeros((3, 64, 64), np.float32))
    probs, _ = backend.predict(np.zeros((1, 3, 64, 64), np.float64))  # converted to float32
    assert probs.dtype == np.float32


class _LogitsOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def test_logits_only_model(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    meta = {"labels": ["a", "b"], "task": "bone_xray", "version": "1"}
    torch.jit.save(
        torch.jit.script(_LogitsOnly()), str(path), _extra_files={"dicomai.json": json.dumps(meta)}
    )
    backend = TorchScriptBackend.load(path, name="tiny", device="cpu")
    probs, cams = backend.predict(_images(2))
    assert probs.shape == (2, 2) and cams is None
    assert backend.identity.architecture == "unknown"


class _OomModule(nn.Module):
    """Raises CUDA OOM for batches larger than ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.calls: list[int] = []

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x.mean(dim=(2, 3))[:, :1], x[:, :1]


def _oom_backend(limit: int) -> tuple[TorchScriptBackend, _OomModule]:
    module = _OomModule(limit)
    identity = ModelIdentity("oom", "1", "0" * 64, Task.BONE_XRAY, "test", "test model")
    backend = TorchScriptBackend(
        module, identity=identity, labels=["abnormal"], device=torch.device("cpu")
    )
    return backend, module


def test_oom_halves_batch_once() -> None:
    backend, module = _oom_backend(limit=2)
    probs, cams = backend.predict(_images(4))
    assert probs.shape == (4, 1) and cams is not None and cams.shape == (4, 1, 64, 64)
    assert module.calls == [4, 2, 2]
    backend, module = _oom_backend(limit=1)
    with pytest.raises(InferenceError, match="out of memory"):
        backend.predict(_images(4))
    assert module.calls == [4, 2]


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("wrap", ["plain", "state_dict_with_module_prefix"])
def test_export_state_dict_matches_module(tmp_path: Path, wrap: str) -> None:
    torch.manual_seed(3)
    module = resnet18(6).eval()
    with torch.no_grad():
        module.classifier.bias.normal_()
    state = module.state_dict()
    obj: object = state
    if wrap != "plain":  # a training checkpoint of a DataParallel model
        obj = {"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}
    ckpt = tmp_path / "ckpt.pth"
    torch.save(obj, ckpt)
    out = export_state_dict(
        "resnet18", ckpt, tmp_path / "mine.pt", name="my-ich", version="2.0", description="Mine."
    )
    meta = read_metadata(out)
    assert meta["weights"] == "user-supplied"
    assert meta["description"] == "Mine."
    assert meta["task"] == "head_ct_ich" and meta["version"] == "2.0"
    backend = TorchScriptBackend.load(out, name="my-ich", device="cpu")
    x = _images(2)
    probs, _ = backend.predict(x)
    with torch.no_grad():
        expected = torch.sigmoid(module(torch.from_numpy(x))[0]).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_export_state_dict_rejects_mismatched_head(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pth"
    torch.save(resnet18(3).state_dict(), ckpt)
    with pytest.raises(ModelLoadError, match="6 outputs"):
        export_state_dict("resnet18", ckpt, tmp_path / "x.pt", name="m", version="1")
    with pytest.raises(ModelLoadError, match="not found"):
        export_state_dict(
            "resnet18", tmp_path / "none.pth", tmp_path / "x.pt", name="m", version="1"
        )
    assert not (tmp_path / "x.pt").exists()


# --------------------------------------------------------------------------- ensure + registry


def test_ensure_model_file_concurrent(tmp_path: Path) -> None:
    target = tmp_path / "models" / "ct.pt"
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_model_file("head-ct-ich", target)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, True]
    assert read_metadata(target)["name"] == "head-ct-ich"
    assert not ensure_model_file("head-ct-ich", target)
    assert not ensure_model_file("my-model", tmp_path / "missing.pt")
    assert not (tmp_path / "missing.pt").exists()
    assert not [p for p in target.parent.iterdir() if p.suffix == ".tmp"]
    assert target.stat().st_mode & 0o777 == 0o644


class _FakeBackend:
    def __init__(self, name: str) -> None:
        self.identity = ModelIdentity(name, "1", "0" * 64, Task.CHEST_XRAY, "fake", "fake")
        self.labels = ("a",)
        self.device = "cpu"

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return np.zeros((len(batch), 1), np.float32), None


def test_registry_loads_once() -> None:
    calls: list[str] = []
    gate = threading.Event()

    def loader(path: object, *, name: str, **kwargs: object) -> _FakeBackend:
        calls.append(name)
        gate.wait(1)
        return _FakeBackend(name)

    registry = ModelRegistry(loader=loader)
    got: list[ModelBackend] = []
    make: Callable[[], None] = lambda: got.append(registry.load("chest", path="x.pt"))  # noqa: E731
    threads = [threading.Thread(target=make) for _ in range(3)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert calls == ["chest"]
    assert all(b is got[0] for b in got)
    assert registry.get("chest") is got[0]
    assert registry.loaded() == ["chest"] and "chest" in registry and len(registry) == 1
    with pytest.raises(KeyError, match="bone"):
        registry.get("bone")
    registry.add("bone", _FakeBackend("bone"))
    assert registry.loaded() == ["bone", "chest"]
    with pytest.raises(ValueError):
        registry.add("bone", _FakeBackend("bone"))


def test_registry_with_real_backend(reference_dir: Path) -> None:
    registry = ModelRegistry()
    path = _ref_path(reference_dir, "head-ct-ich")
    backend = registry.load("head-ct-ich", path=path, sha256=_sha(path), device="cpu")
    assert backend.identity.task is Task.HEAD_CT_ICH
    assert registry.load("head-ct-ich", path="ignored.pt") is backend
    with pytest.raises(ModelLoadError):
        registry.load("other", path=path, sha256="1" * 64, device="cpu")
    assert registry.loaded() == ["head-ct-ich"]


def test_cam_classifier_is_scriptable() -> None:
    scripted = torch.jit.script(CamClassifier(nn.Sequential(nn.Conv2d(3, 4, 3)), nn.Linear(4, 2)))
    logits, cams = scripted(torch.zeros(1, 3, 8, 8))
    assert logits.shape == (1, 2) and cams.shape == (1, 2, 6, 6)
