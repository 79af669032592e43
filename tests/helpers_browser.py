"""Headless Chromium for the dashboard tests: the page's DOM after its scripts ran, and a
screenshot. Debian's `chromium` (`make test` installs it when it can); a test skips, saying so,
when it is absent."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; make test does it as root)")
    return exe


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    cmd = [
        chromium(),
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        "--virtual-time-budget=8000",  # let the page fetch its state and draw before the dump
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def dom(url: str, tmp: Path) -> str:
    """The serialised DOM of `url` once its scripts ran."""
    return _run(["--dump-dom", url], tmp).stdout


def screenshot(url: str, path: Path, tmp: Path, *, size: str = "1400,2600") -> np.ndarray:
    """Save a PNG of `url` at `path`; returns its pixels (uint8 [H,W,3])."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--screenshot={path}", f"--window-size={size}", url], tmp)
    return np.asarray(Image.open(path).convert("RGB"))


def not_blank(pixels: np.ndarray) -> bool:
    """More than a handful of distinct colours, and no single colour covering nearly everything."""
    flat = pixels.reshape(-1, 3)
    colours, counts = np.unique(flat, axis=0, return_counts=True)
    return len(colours) > 20 and counts.max() < 0.97 * len(flat)
