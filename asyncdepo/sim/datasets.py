"""Synthetic datasets for the demo, tests and benchmarks: deterministic, detector-like where it matters.

Detector-like data: 16-bit little-endian pixels with low Poisson-like counts (mostly 0-3, a few
bright spots), which compresses about 5:1 with zstd level 3 — like real diffraction frames, unlike
random bytes. Generated from a seeded PRNG so every run and every tool sees the same bytes.
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path
from typing import Any

_TILE_CACHE: dict[int, bytes] = {}


def _tile(seed: int, size: int = 1 << 20) -> bytes:
    """1 MiB of detector-like pixels for ``seed`` (cached)."""
    key = seed % 64
    if key not in _TILE_CACHE:
        rng = random.Random(key)
        weights = [60, 25, 9, 4, 2]
        counts = rng.choices(range(5), weights, k=size // 2)
        for _ in range(size // 2 // 500):  # bright Bragg-like spots
            counts[rng.randrange(len(counts))] = rng.randrange(200, 60000)
        _TILE_CACHE[key] = b"".join(c.to_bytes(2, "little") for c in counts)
    return _TILE_CACHE[key]


def detector_bytes(size: int, seed: int) -> bytes:
    """``size`` bytes of detector-like data (deterministic for ``seed``)."""
    out = bytearray()
    i = 0
    while len(out) < size:
        out += _tile(seed + i)
        i += 1
    return bytes(out[:size])


def write_detector_file(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        left, i = size, 0
        while left > 0:
            block = _tile(seed + i)[: min(left, 1 << 20)]
            fh.write(block)
            left -= len(block)
            i += 1


def make_files(root: Path, count: int, size: int, *, detector: bool = True, prefix: str = "f",
               per_dir: int = 1000) -> Path:
    """``count`` files of ``size`` bytes under ``root`` (``per_dir`` per subdirectory); idempotent."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        sub = root / f"d{i // per_dir:04d}" if count > per_dir else root
        p = sub / f"{prefix}{i:07d}.bin"
        if p.exists() and p.stat().st_size == size:
            continue
        if detector:
            write_detector_file(p, size, i)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(random.Random(i).randbytes(size))
    return root


def make_demo_dataset(root: Path, files: int = 300) -> Path:
    """A small mixed dataset: detector frames, logs and metadata, a nested directory."""
    rng = random.Random(42)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        if i % 10 == 0:
            write_detector_file(root / "frames" / f"frame_{i:05d}.cbf", 2 << 20, i)
        elif i % 3 == 0:
            p = root / "logs" / f"run_{i:05d}.log"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("".join(f"{j} exposure=0.1 omega={j * 0.1:.1f}\n" for j in range(rng.randrange(50, 500))))
        else:
            p = root / "meta" / f"{i // 50:02d}" / f"item_{i:05d}.json"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f'{{"sample": {i}, "beamline": "demo"}}\n')
    os.utime(root, None)
    return root


def make_png(width: int, height: int) -> bytes:
    """A valid 8-bit greyscale PNG of the given size, all black (EMPIAR image-set thumbnails in tests)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" * (width + 1) for _ in range(height))  # filter byte 0, then the pixels
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def sample_deposition(*directories: str) -> dict[str, Any]:
    """A valid EMPIAR deposition JSON with one image set per directory (``data/...``), for tests and the demo."""
    person = {"first_name": "Ada", "last_name": "Lovelace", "organization": "EMBL-EBI", "email": "ada@example.org",
              "country": "GB", "town_or_city": "Hinxton", "post_or_zip": "CB10 1SD"}
    author = {"name": "('Lovelace', 'A')", "order_id": 0, "author_orcid": None}
    return {
        "title": "A simulated deposition of image sets",
        "release_date": "HO",
        "experiment_type": 3,
        "authors": [author],
        "corresponding_author": person,
        "principal_investigator": [person],
        "imagesets": [{"name": f"set {d}", "directory": d, "category": "('T1', '')", "header_format": "('T2', '')",
                       "data_format": "('T2', '')", "num_images_or_tilt_series": 3, "frames_per_image": 1,
                       "voxel_type": "('T5', '')"} for d in directories],
        "citation": [{"authors": [author], "published": False, "j_or_nj_citation": True, "title": "In preparation"}],
    }
