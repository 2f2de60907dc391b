"""Compiled artifacts: one folder with the library, the parameters and a manifest.

An artifact is written into a temporary sibling folder and renamed into place only when complete, so an
interrupted compile never leaves something that looks valid. Loading checks the manifest and every file it lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .. import __version__
from ..errors import VlmcError
from ..runtime.artifact import FORMAT_VERSION, MANIFEST, file_sha256, quick_sha256, read_manifest


def kernels_digest() -> str:
    """The native kernels' source (compiled into every graph library): a changed kernel rebuilds the artifact."""
    return hashlib.sha256((Path(__file__).parent / "kernels" / "kernels.c").read_bytes()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    import tvm
    import torch
    import transformers

    return {"vlmc": __version__, "kernels": kernels_digest(), "tvm": tvm.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


def weights_fingerprint(checkpoint_dir: str | Path) -> str:
    """A fast fingerprint of a checkpoint's weights: each safetensors file's name, size, header and edges.

    Reading whole multi-GB files on every compile would make 'already up to date' slow; the safetensors
    header lists every tensor's dtype, shape and offsets, and the edges catch rewritten values.
    """
    digest = hashlib.sha256()
    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise VlmcError(f"{checkpoint_dir}: no *.safetensors weights")
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            f.seek(0)
            digest.update(f.read(min(size, 8 + header_len + (1 << 20))))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read())
    config = Path(checkpoint_dir) / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    return digest.hexdigest()


@contextmanager
def staging_folder(final: Path):
    """Yield a temporary folder beside `final`; on success it replaces `final` atomically (rename)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: Path, manifest: dict) -> None:
    """Record every file's hash (and quick hash, checked on every load) so a corrupted artifact is detected."""
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p),
                                          "quick_sha256": quick_sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = dict(manifest, format_version=FORMAT_VERSION, files=files,
                    created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def is_up_to_date(folder: Path, config_digest: str, weights_digest: str, host: dict | None = None) -> bool:
    """An artifact in `folder` built from this config, these weights, this vlmc and these kernels (and, given,
    the host steps `host` the architecture describes today: a new host setting, e.g. video, rebuilds it)."""
    try:
        manifest = read_manifest(folder, verify=False)
    except VlmcError:
        return False
    return (manifest.get("config_hash") == config_digest and manifest.get("weights_fingerprint") == weights_digest
            and manifest.get("versions", {}).get("vlmc") == __version__
            and manifest.get("versions", {}).get("kernels") == kernels_digest()
            and (host is None or manifest.get("host") == json.loads(json.dumps(host))))


class Stages:
    """Prints each compile stage with its time, so a long compile shows where it is."""

    def __init__(self, names: list[str], stream=None):
        import sys

        self.names = names
        self.stream = stream or sys.stderr
        self.index = 0
        self.start = time.perf_counter()
        self.times: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, detail: str = ""):
        self.index += 1
        label = f"[{self.index}/{len(self.names)}] {name}" + (f" ({detail})" if detail else "")
        print(f"{label} ...", file=self.stream, flush=True)
        t0 = time.perf_counter()
        yield
        self.times[name] = round(time.perf_counter() - t0, 3)
        print(f"{label} done in {self.times[name]:.1f}s", file=self.stream, flush=True)

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.start, 3)
