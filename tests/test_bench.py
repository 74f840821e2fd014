"""The benchmark's quick mode runs end to end, and nightshift keeps up with mlx-lm.

The quick mode puts the same prompts through mlx-lm's own ``batch_generate`` (B) and
through ``nightshift submit`` + a real ``nightshift worker --drain`` (C). If the
worker's throughput falls below 0.8 of the engine's ceiling, something between the
queue and the model (claims, database writes per step, refills) costs too much. Part E
(llama.cpp) is skipped: it needs the ``bench`` extra, which compiles llama.cpp. The
roofline runs, and its figures must be there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"
MIN_C_OVER_B = 0.8


def test_quick_benchmark(tmp_path):
    out = tmp_path / "bench.json"
    # One BLAS thread: B and C run at different moments, and two spinning OpenBLAS
    # threads slow down many times over whenever anything else on the machine runs,
    # which would be measured as ours. The ratio does not depend on the thread count.
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--blas-threads", "1",
                           "--skip", "E", "--json-out", str(out)],
                          capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    print(proc.stderr[-3000:], file=sys.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    b, c = figures["B"], figures["C"]
    print(f"B {b['gen_tps']:.1f} tok/s, C {c['gen_tps']:.1f} tok/s, "
          f"C/B {figures['ratios']['c_over_b']:.3f}, occupancy {c['occupancy']:.3f}, "
          f"load {figures['machine']['load_before']['loadavg']}")
    assert c["done"] == c["requests"] and c["failed"] == 0
    assert figures["ratios"]["c_over_b"] >= MIN_C_OVER_B, (
        f"nightshift end to end runs at {figures['ratios']['c_over_b']:.2f} of mlx-lm's "
        f"batch_generate (B {b['gen_tps']:.1f} tok/s, C {c['gen_tps']:.1f} tok/s); "
        f"at least {MIN_C_OVER_B} expected")
    roofline = figures["roofline"]
    assert roofline["flops_per_token"] > 0 and roofline["seconds"] > 0, roofline
    assert figures["ratios"]["roofline_share"] > 0, figures["ratios"]
    if "D" in figures:
        assert figures["D"]["identical_outputs"], figures["D"]["differing"]
    structured = figures["F"]
    assert structured["valid"] == structured["prompts"], structured
    assert structured["schema"]["gen_tps"] > 0 and structured["free"]["gen_tps"] > 0
