"""The gateway process holds no model: it never imports torch or transformers' model code."""

import subprocess
import sys


def test_gateway_process_imports_neither_torch_nor_model_code(tiny_dir):
    code = (
        "import sys\n"
        "import gateway.__main__, gateway.app, gateway.http\n"
        f"from specserve.tokenizer import load_tokenizer; load_tokenizer({str(tiny_dir[0])!r})\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.') or '.modeling_' in m)\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
