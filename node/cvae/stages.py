"""The CVAE route's train and synthesize stages (docs/DESIGN.md 3.4; Di Salvo et al., BMVC 2024).

train:      the train split's embeddings by the federation's pinned extractor (node.cvae.embeddings,
            cached), a conditional VAE on them (node.cvae.generator), and two re-identification heads on
            embeddings for the audit: phi_id and the independent attacker (another width and
            seed). Outputs in models/: cvae, phi_id, phi_attack (.safetensors + .json). With
            synth.cvae.federated and dp the CVAE is left untrained (scaler only): the federated
            rounds are the whole DP plan.
synthesize: sample labels (replicate the train class counts, or synth.target_size in their
            proportions) and decode one embedding per label. Outputs synth/<run_id>/
            candidates.npz (embeddings float32 [M,D], labels int64 [M]) and synth.json, with the
            DP epsilon and delta actually spent (per patient) when the CVAE was trained with DP
            ("dp_epsilon", "dp_delta"; None without) and the "dp" block: the unit, the budget's
            parts and the caveats (node.cvae.dp.report; {"enabled": false} without DP), which the
            audit report carries into the signed bundle. With synth.cvae.federated
            it samples from models/cvae_global (the federation's decoder, node.cvae.federated) and
            synth.json names that decoder's sha256.

Both return at once when nothing they depend on changed, like the PLAN route's stages.
"""

from __future__ import annotations

import io
import time

import numpy as np
import torch

from common.fileio import atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file
from common.models import EmbeddingHead
from node.cvae.checkpoint import load_cvae, save_cvae
from node.cvae.dp import dp_block
from node.cvae.embedder import extractor_digest
from node.cvae.embeddings import split_embeddings
from node.cvae.generator import initial_cvae, train_cvae
from node.cvae.sampling import sample_cvae, sample_labels
from node.federation.task import evaluate_classifier, train_classifier
from node.site.checkpoint import config_digest, load_weights, read_sidecar, save_model
from node.site.device import pick_device
from node.site.ingest import load_split, read_splits
from node.site.workspace import Workspace

MODEL_NAMES = ("cvae", "phi_id", "phi_attack")
REID_HIDDEN = {"phi_id": 128, "phi_attack": 192}  # two widths, two seeds: the attacker is not phi_id


def _key(ws: Workspace) -> tuple[dict, str]:
    cfg = ws.config()
    # The sampling options are left out (synthesize reads them), and so is `federated` without dp: the
    # local CVAE is the same model either way (it is the federated run's start). With dp it is not.
    cc = cfg.synth.cvae
    section = {
        "cvae": cc.model_dump(mode="json", exclude={"sample", "sample_noise"} | (set() if cc.dp else {"federated"})),
        "extractor": cfg.synth.extractor.model_dump(mode="json"),
        "classifier": cfg.models.classifier.model_dump(mode="json"),
        "seed": cfg.models.seed,
    }
    data_sha = sha256_file(ws.data / "dataset.npz")[:16] + sha256_file(ws.data / "splits.json")[:16]
    return section, config_digest(section) + ":" + data_sha


def train(ws: Workspace) -> None:
    cfg = ws.config()
    section, key = _key(ws)
    if all(
        (ws.models / f"{n}.json").exists() and read_sidecar(ws.models / f"{n}.safetensors").get("key") == key
        for n in MODEL_NAMES
    ):
        return  # same config, same data: the models on disk are these models
    device = pick_device(cfg.device)
    x, y = split_embeddings(ws, cfg.synth.extractor, "train", device=device)
    n_classes = read_splits(ws)["n_classes"]
    common = {
        "config": section,
        "config_sha256": config_digest(section),
        "key": key,
        "extractor_digest": extractor_digest(cfg.synth.extractor),
    }

    # Re-identification on embeddings: which train patient is this record? Trained on the train
    # records themselves, as phi_id is in the PLAN route; the audit's threshold comes from holdout.
    patients = load_split(ws, "train").patient_ids
    identities, id_labels = np.unique(patients, return_inverse=True)
    cc = cfg.models.classifier
    for i, (name, hidden) in enumerate(REID_HIDDEN.items()):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.models.seed + 2 + 2 * i)
            model = EmbeddingHead(x.shape[1], len(identities), hidden=hidden).fit_scaler(torch.from_numpy(x))
        loss = train_classifier(
            model,
            x,
            id_labels,
            epochs=cc.id_epochs,
            lr=cc.lr,
            batch_size=cc.batch_size,
            device=device,
            seed=cfg.models.seed + 2 + 2 * i,
            augment="none",
        )
        acc = evaluate_classifier(model, x, id_labels, device=device)["accuracy"]
        save_model(
            ws.models / f"{name}.safetensors",
            model,
            sidecar={
                **common,
                "class": "EmbeddingHead",
                "kwargs": {"d_in": int(x.shape[1]), "n_classes": len(identities), "hidden": hidden},
                "steps": cc.id_epochs,
                "identities": identities.tolist(),
                "metrics": {"final_loss": loss, "train_accuracy": acc, "n_train": len(x)},
            },
        )

    t0 = time.time()
    # patient ids: with dp the unit of privacy is the patient (node.cvae.dp), not the image
    if cfg.synth.cvae.federated and cfg.synth.cvae.dp:
        # the federated rounds are the whole DP plan: local pre-training would spend budget outside it
        result = initial_cvae(x, y, n_classes=n_classes, cfg=cfg.synth.cvae, seed=cfg.models.seed, groups=patients)
    else:
        result = train_cvae(
            x, y, n_classes=n_classes, cfg=cfg.synth.cvae, seed=cfg.models.seed, device=device, groups=patients
        )
    save_cvae(ws.models / "cvae.safetensors", result, sidecar={**common, "seconds": round(time.time() - t0, 2)})


def load_reid(ws: Workspace, name: str, device: torch.device | str = "cpu") -> EmbeddingHead:
    """phi_id or phi_attack of the CVAE route, in eval mode, frozen."""
    side = read_sidecar(ws.models / f"{name}.safetensors")
    model = load_weights(
        ws.models / f"{name}.safetensors",
        EmbeddingHead(side["kwargs"]["d_in"], side["kwargs"]["n_classes"], hidden=side["kwargs"]["hidden"]),
        device=device,
    )
    return model.eval().requires_grad_(False)


GLOBAL_NAME = "cvae_global"  # synth.cvae.federated: the site's scaler and encoder with the federation's decoder


def synth_model(ws: Workspace) -> str:
    """The name in models/ of the CVAE synthesize samples from: cvae, or cvae_global when federated.
    Raises FileNotFoundError when the federated run has not delivered its decoder yet."""
    if not ws.config().synth.cvae.federated:
        return "cvae"
    if not (ws.models / f"{GLOBAL_NAME}.json").exists():
        raise FileNotFoundError(
            f"{ws.models / GLOBAL_NAME}.safetensors: missing: the federated CVAE has not finished "
            "(synth.cvae.federated is on, so this site samples from the federation's decoder, "
            "which the coordinator's CVAE run delivers to the SuperNode in its last round)"
        )
    side = read_sidecar(ws.models / f"{GLOBAL_NAME}.safetensors")
    if not side.get("final", False):
        raise FileNotFoundError(
            f"{ws.models / GLOBAL_NAME}.safetensors holds the federation's decoder "
            f"of round {side.get('server_round')} of {side.get('rounds')}: the federated CVAE has not finished"
        )
    return GLOBAL_NAME


def run_id_for(ws: Workspace) -> str:
    """12 hex digits of a sha256 of the synth config and the weights of the CVAE sampled from."""
    side = read_sidecar(ws.models / f"{synth_model(ws)}.safetensors")
    return sha256_bytes((config_digest(ws.config().synth) + side["weights_sha256"]).encode())[:12]


def synthesize(ws: Workspace) -> str:
    cfg = ws.config()
    sc = cfg.synth
    run_id = run_id_for(ws)
    out_dir = ws.synth / run_id
    if not ((out_dir / "candidates.npz").exists() and (out_dir / "synth.json").exists()):
        t0 = time.time()
        name = synth_model(ws)
        result = load_cvae(ws.models / f"{name}.safetensors", device=pick_device(cfg.device))
        _, train_labels = split_embeddings(ws, sc.extractor, "train", device=pick_device(cfg.device))
        labels = sample_labels(train_labels, mode=sc.cvae.sample, target_size=sc.target_size, seed=sc.seed)
        emb = sample_cvae(result, labels, seed=sc.seed, noise=sc.cvae.sample_noise)
        buf = io.BytesIO()
        np.savez(buf, embeddings=emb, labels=labels)
        atomic_write_bytes(out_dir / "candidates.npz", buf.getvalue())
        side = read_sidecar(ws.models / f"{name}.safetensors")
        # federated: whose decoder this is (the federation's, by the digest every site received)
        federated = (
            {
                "decoder": {
                    "source": "federation",
                    "global_decoder_sha256": side["global_decoder_sha256"],
                    "flower_run_id": side.get("flower_run_id"),
                    "server_round": side.get("server_round"),
                    "rounds": side.get("rounds"),
                }
            }
            if name == GLOBAL_NAME
            else {}
        )
        atomic_write_json(
            out_dir / "synth.json",
            {
                "run_id": run_id,
                "route": "cvae",
                "config": sc.model_dump(mode="json"),
                "config_sha256": config_digest(sc),
                "cvae_sha256": side["weights_sha256"],
                "extractor_digest": extractor_digest(sc.extractor),
                "counts": {
                    "n_train": len(train_labels),
                    "n_candidates": len(labels),
                    "embedding_dim": int(emb.shape[1]),
                    "per_class": {int(c): int((labels == c).sum()) for c in np.unique(labels)},
                },
                "cvae": {
                    "epochs_trained": result.epochs_trained,
                    "best_epoch": result.best_epoch,
                    "best_val_loss": result.best_val_loss,
                },
                # The (epsilon, delta) per patient actually spent: DP scaler, DP noise scale and the
                # DP-SGD steps trained, composed (None without DP); "dp" has the parts and the caveats.
                "dp_epsilon": result.epsilon,
                "dp_delta": result.delta,
                "dp": dp_block(result),
                "seconds": {"total": round(time.time() - t0, 2)},
                **federated,
            },
        )
    atomic_write_json(ws.synth / "latest.json", {"run_id": run_id})
    return run_id
