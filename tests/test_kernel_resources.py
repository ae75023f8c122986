"""scripts/kernel_resources.py compiles the kernels for sm_90 on the CPU (Triton's own ptxas) and reads
their machine code: the matrix instructions it counts per step must match the tile shapes, and the
main step loops of the default block-sparse configuration and of the decode target kernel (both its
variants) must not spill (a 1.5-3% slowdown on an H200 when the block-sparse one did)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "kernel_resources.py"


@pytest.mark.slow
def test_kernel_resources_reads_the_compiled_kernels(tmp_path):
    output = tmp_path / "resources.json"
    # TRITON_INTERPRET=1 stays set (as in the test session): the script compiles for the GPU anyway
    environment = {**os.environ,
                   "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(SCRIPT), "--output", str(output)], env=environment,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    kernels = {row["kernel"]: row for row in json.loads(output.read_text())["kernels"]}
    assert len(kernels) == 6 and "| block-sparse, mask per KV head |" in result.stdout
    for row in kernels.values():
        assert 0 < row["registers"] <= 255 and row["shared_kib"] > 0
        # one m64 wgmma per 16 of the head dim (q k^T) and per 16 keys (p v), per 64 rows of a warpgroup
        rows_per_warpgroup = row.get("GM", 1) * row["BLOCK_Q"] // (row["num_warps"] // 4)
        expected = rows_per_warpgroup // 64 * (128 // 16 + row["BLOCK_N"] // 16)
        assert row["main_step_loop"]["matrix"] == expected, row
        assert row["main_step_loop"]["exp2"] >= rows_per_warpgroup * row["BLOCK_N"] // 128
    for name in ("block-sparse, mask per KV head", "decode distillation target (one pass)",
                 "decode distillation target, block_mass (one pass)"):
        hot = kernels[name]["main_step_loop"]
        assert hot["local_loads"] + hot["local_stores"] <= 2, (name, hot)
