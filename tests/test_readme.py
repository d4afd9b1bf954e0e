"""Every ```python block of README.md runs as written (so the README cannot rot).

Each block runs on its own, in a fresh namespace. Without a GPU the only changes are the device
string "cuda" -> "cpu" and cuda_graph=True -> cuda_graph=False; with one, nothing changes."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README.read_text(), re.M | re.S)
CPU_SUBSTITUTIONS = (('"cuda"', '"cpu"'), ("cuda_graph=True", "cuda_graph=False"))


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index):
    code = BLOCKS[index]
    if not torch.cuda.is_available():
        for old, new in CPU_SUBSTITUTIONS:
            code = code.replace(old, new)
        assert "cuda" not in code.replace("cuda_graph", ""), "a CUDA-only call the substitutions do not cover"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threads would only spin against each other on a shared CPU
    try:
        exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
    finally:
        torch.set_num_threads(threads)
