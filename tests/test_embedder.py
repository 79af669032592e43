"""Feature extractors of the CVAE route (node.cvae.embedder) and the site's embedding cache
(node.cvae.embeddings). Pretrained weights do not exist on a test machine: the timm and torchvision
paths are exercised with randomly initialised networks saved into a temporary model store."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from common.config import ExtractorConfig, FederationConfig
from common.modelstore import ModelStoreError
from node.cvae.embedder import build_extractor, embed_images, extractor_digest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _images(n: int = 6, size: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the extractor tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_tiny_is_the_same_network_on_every_build_and_leaves_the_rng_alone(tmp_path):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = (
        build_extractor(ExtractorConfig(), store_dir=tmp_path),
        build_extractor(ExtractorConfig(), store_dir=tmp_path),
    )
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    imgs = _images()
    ea, eb = embed_images(a, imgs, device="cpu"), embed_images(b, imgs, device="cpu", batch_size=4)
    assert ea.shape == (6, a.dim) == (6, 128) and ea.dtype == np.float32
    assert a.dim == ExtractorConfig().dim  # the length the coordinator builds its head for, without building a network
    assert np.allclose(ea, eb, atol=1e-6)
    assert np.abs(ea[0] - ea[1]).max() > 1e-3  # different images, different embeddings
    other = build_extractor(ExtractorConfig(seed=1), store_dir=tmp_path)
    assert not np.allclose(embed_images(other, imgs, device="cpu"), ea)
    # any input size: resized to the network's 32x32
    assert embed_images(a, _images(size=64), device="cpu").shape == (6, 128)
    with pytest.raises(ValueError, match="uint8"):
        embed_images(a, imgs.astype(np.float32), device="cpu")


def test_digest_names_the_embedding_space():
    tiny = extractor_digest(ExtractorConfig())
    assert tiny == extractor_digest(ExtractorConfig(seed=0)) and len(tiny) == 16
    assert tiny != extractor_digest(ExtractorConfig(seed=1))
    r = ExtractorConfig(arch="resnet18", weights="r.pth", sha256="a" * 64)
    assert extractor_digest(r) != extractor_digest(r.model_copy(update={"sha256": "b" * 64}))
    # the file name is not part of it: the same bytes under another name embed the same
    assert extractor_digest(r) == extractor_digest(r.model_copy(update={"weights": "other.pth"}))


def test_config_requires_a_pinned_weight_file_for_pretrained_archs():
    assert FederationConfig().extractor == ExtractorConfig(arch="tiny")
    with pytest.raises(ValidationError, match="extractor.weights is required"):
        ExtractorConfig(arch="dinov2_vits14")
    with pytest.raises(ValidationError, match="extractor.sha256 must be .*64 hex"):
        ExtractorConfig(arch="resnet50", weights="resnet50-11ad3fa6.pth", sha256="11ad3fa6")
    with pytest.raises(ValidationError, match="must be unset for arch 'tiny'"):
        ExtractorConfig(weights="x.pth", sha256="0" * 64)


def test_missing_or_wrong_weight_file_is_a_model_store_error_naming_it(tmp_path, no_network):
    cfg = ExtractorConfig(arch="dinov2_vits14", weights="vits14.safetensors", sha256="c" * 64)
    with pytest.raises(
        ModelStoreError, match=r"'vits14.safetensors'.*not in the local model store.*nothing is downloaded"
    ):
        build_extractor(cfg, store_dir=tmp_path)
    (tmp_path / "vits14.safetensors").write_bytes(b"not these weights")
    with pytest.raises(ModelStoreError, match=r"vits14.safetensors: sha256 is .*expected c{64}"):
        build_extractor(cfg, store_dir=tmp_path)


def test_resnet_loads_from_the_store_without_the_network(tmp_path, no_network):
    import torchvision

    torch.manual_seed(0)
    src = torchvision.models.resnet18(weights=None).eval()
    torch.save(src.state_dict(), tmp_path / "resnet18-test.pth")
    cfg = ExtractorConfig(arch="resnet18", weights="resnet18-test.pth", sha256=_sha(tmp_path / "resnet18-test.pth"))
    ex = build_extractor(cfg, store_dir=tmp_path)
    assert ex.dim == 512 == cfg.dim and ex.input_size == 224 and ex.in_chans == 3
    imgs = _images(n=2)
    got = embed_images(ex, imgs, device="cpu")
    x = ex.preprocess(torch.from_numpy(imgs))
    assert x.shape == (2, 3, 224, 224)
    grey = x * ex.std + ex.mean  # undo the ImageNet normalisation: the same grey image in every channel
    assert torch.allclose(grey[:, 0], grey[:, 2], atol=1e-6) and float(grey.min()) >= 0 and float(grey.max()) <= 1
    src.fc = torch.nn.Identity()
    with torch.no_grad():
        assert np.allclose(got, src(x).numpy(), atol=1e-5)


def test_dinov2_loads_hub_shaped_weights_from_the_store_without_the_network(tmp_path, no_network):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    # the published checkpoint's geometry (518 px, a 37x37 position grid); the extractor runs at 224
    src = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, num_classes=0)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "vits14.safetensors")
    cfg = ExtractorConfig(
        arch="dinov2_vits14", weights="vits14.safetensors", sha256=_sha(tmp_path / "vits14.safetensors")
    )
    ex = build_extractor(cfg, store_dir=tmp_path)
    assert ex.dim == 384 == cfg.dim and ex.input_size == 224 and ex.interpolation == "bicubic"
    assert torch.equal(ex.backbone.blocks[3].attn.qkv.weight, src.blocks[3].attn.qkv.weight)  # the file's weights
    assert ex.backbone.pos_embed.shape[1] == 1 + 16 * 16  # resampled to 224 / 14
    out = embed_images(ex, _images(n=2), device="cpu")
    assert out.shape == (2, 384) and np.isfinite(out).all()


@pytest.mark.skipif(
    not (SHARED_DATA / "pneumoniamnist.npz").exists(), reason=f"{SHARED_DATA}/pneumoniamnist.npz not present"
)
def test_tiny_embeddings_separate_pneumoniamnist_classes(tmp_path):
    from common.metrics import roc_auc

    with np.load(SHARED_DATA / "pneumoniamnist.npz") as z:
        xtr, ytr = z["train_images"][:1500], z["train_labels"][:1500, 0].astype(np.int64)
        xte, yte = z["test_images"], z["test_labels"][:, 0]
    ex = build_extractor(ExtractorConfig(), store_dir=tmp_path)
    a, b = torch.from_numpy(embed_images(ex, xtr, device="cpu")), torch.from_numpy(embed_images(ex, xte, device="cpu"))
    m, s = a.mean(0), a.std(0) + 1e-6
    lin = torch.nn.Linear(a.shape[1], 2)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (
            torch.nn.functional.cross_entropy(lin((a - m) / s), torch.from_numpy(ytr)) + 1e-3 * lin.weight.pow(2).sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    p = lin((b - m) / s).softmax(1)[:, 1].detach().numpy()
    assert roc_auc(p[yte == 1], p[yte == 0]) > 0.85


def test_embedding_cache_is_reused_and_rebuilt_for_a_new_data_set(tiny_workspace, monkeypatch):
    import node.cvae.embeddings as E
    from node.site.ingest import ingest, load_split

    ws = tiny_workspace
    ingest(ws)
    calls = []
    real_embed = E.embed_images
    monkeypatch.setattr(E, "embed_images", lambda *a, **k: calls.append(len(a[1])) or real_embed(*a, **k))
    cfg = ExtractorConfig()
    x, y = E.split_embeddings(ws, cfg, "train", device="cpu")
    train = load_split(ws, "train")
    assert x.shape == (len(train), 128) and x.dtype == np.float32 and np.array_equal(y, train.labels)
    assert calls == [48]  # every image of every split, once
    path = E.cache_path(ws, cfg)
    assert path.parent == ws.data and path.name == f"embeddings-{extractor_digest(cfg)}.safetensors"
    stamp = path.stat().st_mtime_ns
    # the other splits and a second call come from the cache
    xh, _ = E.split_embeddings(ws, cfg, "holdout", device="cpu")
    x2, _ = E.split_embeddings(ws, cfg, "train", device="cpu")
    assert calls == [48] and path.stat().st_mtime_ns == stamp and np.array_equal(x, x2)
    assert len(xh) == len(load_split(ws, "holdout"))
    # embeddings are per image: the cached row is the image's own embedding
    direct = real_embed(build_extractor(cfg, store_dir=ws.root), train.images[:3], device="cpu")
    assert np.allclose(direct, x[:3], atol=1e-6)
    # a new data set (another phantom seed) invalidates it
    ws.config_path.write_text(ws.config_path.read_text().replace("seed: 1}", "seed: 2}"))
    ingest(ws)
    x3, _ = E.split_embeddings(ws, cfg, "train", device="cpu")
    assert calls == [48, 48] and not np.array_equal(x3[: len(x)], x[: len(x3)])
    with pytest.raises(ValueError, match="unknown split"):
        E.split_embeddings(ws, cfg, "val", device="cpu")
