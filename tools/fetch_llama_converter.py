"""Fetch llama.cpp's own HF->GGUF converter for the tests (an install step, never run at test time).

The converter ships in the llama-cpp-python source distribution (vendor/llama.cpp), not in its wheel. This downloads
the sdist of the installed version from PyPI and unpacks only the converter and the Python packages it imports into
.cache/llama.cpp/, where tests/test_gguf_llama_cpp.py looks for it.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

DEST = Path(__file__).resolve().parents[1] / ".cache" / "llama.cpp"
KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def main() -> int:
    if (DEST / "convert_hf_to_gguf.py").exists():
        print(f"llama.cpp converter already at {DEST}")
        return 0
    try:
        v = version("llama_cpp_python")
    except PackageNotFoundError:
        print("llama-cpp-python is not installed; nothing to fetch", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={v}", "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("*.tar.gz"))
        prefix = f"{sdist.name[:-len('.tar.gz')]}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                if m.name.startswith(prefix) and m.name[len(prefix):].startswith(KEEP) and m.isfile():
                    m.name = m.name[len(prefix):]
                    tar.extract(m, DEST, filter="data")
    if not (DEST / "convert_hf_to_gguf.py").exists():
        print(f"the llama-cpp-python {v} sdist has no vendor/llama.cpp/convert_hf_to_gguf.py", file=sys.stderr)
        return 1
    print(f"llama.cpp converter ({v}) unpacked to {DEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
