"""Checkpoints as safetensors with a JSON sidecar; optimizer state too. Nothing is pickled and
nothing is unpickled: a checkpoint from another site or an old run cannot execute code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from common.fileio import atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file


def config_digest(section: Any) -> str:
    """sha256 of a config section (a pydantic model or plain JSON data), canonical JSON."""
    data = section.model_dump(mode="json") if hasattr(section, "model_dump") else section
    return sha256_bytes(json.dumps(data, sort_keys=True).encode())


def _state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_model(path: Path, module: nn.Module, *, sidecar: dict) -> None:
    """Write `module`'s weights to `path` (.safetensors) and `sidecar` (+ the weights' sha256)
    to the same name with .json. The sidecar is written last: its presence means both are whole."""
    data = st_save(_state_tensors(module))
    atomic_write_bytes(path, data)
    atomic_write_json(path.with_suffix(".json"), {**sidecar, "weights_sha256": sha256_bytes(data)})


def read_sidecar(path: Path) -> dict:
    return json.loads(Path(path).with_suffix(".json").read_text())


def load_weights(path: Path, module: nn.Module, *, device: torch.device | str = "cpu") -> nn.Module:
    """Load safetensors weights into `module` after checking them against the sidecar's digest."""
    path = Path(path)
    side = read_sidecar(path)
    if side.get("weights_sha256") and sha256_file(path) != side["weights_sha256"]:
        raise ValueError(f"{path}: weights do not match the sha256 in {path.with_suffix('.json').name}")
    module.load_state_dict(st_load(path.read_bytes()))
    return module.to(device)


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as flat tensors `<prefix>.<param index>.<key>` plus JSON-able hyperparameters."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            tensors[f"{prefix}.{idx}.{key}"] = torch.as_tensor(val).detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer_tensors(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str, groups: dict
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, val in tensors.items():
        if name.startswith(prefix + "."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def save_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """A training state: tensors plus JSON metadata, in one safetensors file (atomic)."""
    atomic_write_bytes(
        path, st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"json": json.dumps(meta)})
    )


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("json", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta
