"""Loading a site's images (docs/DESIGN.md 3.2): phantom, MedMNIST-style .npz, class folders
or a CSV manifest, all resized to one square grey size.

Every problem with the input (an unreadable image, a bad manifest row, a missing array) raises
`DataError` naming the file, and the row where there is one, before anything is trained.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common import errors
from common.config import DataConfig
from node.site.phantom import make_phantom

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".gif"}


class DataError(ValueError):
    """The site's data cannot be read as configured; the message names the file and what was expected."""

    exit_code = errors.DATA


@dataclass
class ImageSet:
    """A set of grey images with their class and patient."""

    images: np.ndarray  # uint8 [N,H,W]
    labels: np.ndarray  # int64 [N]
    patient_ids: np.ndarray  # str [N]; without patient ids each image is its own patient

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[idx], self.labels[idx], self.patient_ids[idx])


def _resize(img: Image.Image, size: int) -> np.ndarray:
    img = img.convert("L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _read_image(path: Path, size: int, where: str = "") -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            return _resize(im, size)
    except FileNotFoundError:
        raise DataError(f"{path}{where}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}{where}: cannot read as an image (expected PNG/JPEG/TIFF/BMP): {e}") from None


def _grey_uint8(arr: np.ndarray, path: Path, key: str) -> np.ndarray:
    if arr.ndim == 4 and arr.shape[-1] in (3, 4):
        # ITU-R 601 luma, as PIL's "L" conversion, so the folder and npz routes agree
        arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    elif arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(f"{path}: array {key!r} has shape {arr.shape}; expected grey [N,H,W] or RGB [N,H,W,3]")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0  # float images in [0,1]
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return arr


def _load_npz(path: Path, size: int) -> ImageSet:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise DataError(f"{path}: .npz file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if head != b"PK\x03\x04":  # an .npz is a zip of .npy arrays; NumPy would talk of pickles here
        raise DataError(
            f"{path}: not a NumPy .npz archive (expected a zip of .npy arrays, the file starts with {head!r})"
        )
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read as a NumPy .npz archive: {e}") from None
    with z:
        keys = set(z.files)
        # MedMNIST: train_/val_/test_ prefixes; plain images/labels[/patient_ids] also accepted
        prefixes = [p for p in ("train_", "val_", "test_") if f"{p}images" in keys] or [""]
        imgs, labs, pids = [], [], []
        for p in prefixes:
            if f"{p}images" not in keys or f"{p}labels" not in keys:
                raise DataError(
                    f"{path}: expected arrays '{p}images' and '{p}labels' "
                    f"(MedMNIST train_/val_/test_ or plain images/labels), found {sorted(keys)}"
                )
            try:
                im = _grey_uint8(z[f"{p}images"], path, f"{p}images")
                lab = np.asarray(z[f"{p}labels"])
                pid = np.asarray(z[f"{p}patient_ids"]).astype(str) if f"{p}patient_ids" in keys else None
            except ValueError as e:  # object arrays refuse to load without pickle
                raise DataError(f"{path}: cannot load arrays with prefix {p!r}: {e}") from None
            if lab.ndim == 2 and lab.shape[1] == 1:
                lab = lab[:, 0]
            if lab.ndim != 1 or len(lab) != len(im):
                raise DataError(f"{path}: '{p}labels' has shape {lab.shape}; expected [{len(im)}] or [{len(im)},1]")
            if not np.issubdtype(lab.dtype, np.integer):
                raise DataError(f"{path}: '{p}labels' has dtype {lab.dtype}; expected integer class indices")
            imgs.append(im)
            labs.append(lab.astype(np.int64))
            pids.append(pid if pid is not None else np.array([f"{path.stem}:{p}{i}" for i in range(len(im))]))
    images = np.concatenate(imgs)
    if images.shape[1:] != (size, size):
        images = np.stack([_resize(Image.fromarray(a), size) for a in images])
    return ImageSet(images, np.concatenate(labs), np.concatenate(pids))


def _load_folder(root: Path, size: int) -> ImageSet:
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found (expected one sub-folder per class)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root}: found {len(classes)} class sub-folder(s) {classes}; expected at least 2")
    imgs, labs, pids = [], [], []
    for label, name in enumerate(classes):
        files = sorted(f for f in (root / name).rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        for f in files:
            imgs.append(_read_image(f, size))
            labs.append(label)
            pids.append(str(f.relative_to(root)))
    if not imgs:
        raise DataError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class sub-folders")
    return ImageSet(np.stack(imgs), np.array(labs, dtype=np.int64), np.array(pids))


def _load_csv(path: Path, size: int) -> ImageSet:
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise DataError(f"{path}: CSV manifest not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read as a CSV manifest: {e}") from None
    numbered = [(i + 1, r) for i, r in enumerate(rows) if r and any(c.strip() for c in r)]
    if numbered and numbered[0][1][0].strip().lower() in ("path", "file", "filename", "image"):
        numbered = numbered[1:]  # header row
    if not numbered:
        raise DataError(f"{path}: no rows; expected lines 'path,label[,patient_id]'")
    imgs, labs, pids = [], [], []
    for line, r in numbered:
        where = f" (row {line})"
        if len(r) not in (2, 3) or not r[0].strip():
            raise DataError(f"{path}{where}: expected 'path,label[,patient_id]', got {','.join(r)!r}")
        try:
            label = int(r[1].strip())
        except ValueError:
            raise DataError(f"{path}{where}: label {r[1]!r} is not an integer class index") from None
        if label < 0:
            raise DataError(f"{path}{where}: label {label} is negative; expected a class index >= 0")
        img_path = path.parent / r[0].strip()
        imgs.append(_read_image(img_path, size, f" (listed in {path}, row {line})"))
        labs.append(label)
        pids.append(r[2].strip() if len(r) == 3 and r[2].strip() else r[0].strip())
    return ImageSet(np.stack(imgs), np.array(labs, dtype=np.int64), np.array(pids))


def load_dataset(cfg: DataConfig) -> ImageSet:
    """Load the configured source as grey uint8 images of cfg.image_size x cfg.image_size.

    `max_images` keeps a random but seeded (cfg.split.seed) subset, in original order.
    """
    size = cfg.image_size
    if cfg.source == "phantom":
        ph = cfg.phantom
        data = ImageSet(
            *make_phantom(
                n_patients=ph.n_patients,
                images_per_patient=ph.images_per_patient,
                n_classes=ph.n_classes,
                size=size,
                seed=ph.seed,
            )
        )
    else:
        path = Path(cfg.path)
        data = {"npz": _load_npz, "folder": _load_folder, "csv": _load_csv}[cfg.source](path, size)
    if len(data) == 0:
        raise DataError(f"{cfg.path or 'phantom'}: the data set is empty")
    if cfg.max_images is not None and cfg.max_images < len(data):
        keep = np.sort(np.random.default_rng(cfg.split.seed).permutation(len(data))[: cfg.max_images])
        data = data.subset(keep)
    return data


def n_classes_of(data: ImageSet) -> int:
    return int(data.labels.max()) + 1
