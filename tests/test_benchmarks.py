"""The benchmark scripts still run (tiny models on the CPU) and compare the same weights: results agree exactly.

No timing is asserted here; timings come from GPU runs of the scripts themselves.
"""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def test_forward_benchmark_smoke(capsys):
    import forward

    assert forward.main(["--smoke"]) == 0
    assert "relative L2 0.00e+00" in capsys.readouterr().out


def test_pipeline_benchmark_smoke(capsys):
    import pipeline

    assert pipeline.main(["--smoke"]) == 0
    assert "frames relative L2 vs diffusers: 0.00e+00" in capsys.readouterr().out


def test_attention_benchmark_smoke():
    import attention

    assert attention.main(["--smoke"]) == 0
