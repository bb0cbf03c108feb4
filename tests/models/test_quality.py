"""Quality bounds of the lossy recipes on SmolLM2-135M and held-out real text (Emma excerpt).

A subset fast enough for CI: 3 windows of 512 tokens, rewritten graphs run without Inductor
(same numerics). `llmcompile quality` runs the full measurement recorded in BENCHMARKS.md.
"""

import pytest

from llmcompile.tools.quality import run_quality


@pytest.fixture(scope="module")
def quality(smollm2_path):
    result = run_quality("smollm2", ("int8", "int4-rtn", "int4"), windows=3, seq_len=512,
                         progress=False)
    return {row["config"]: row for row in result["rows"]}


def test_int8_perplexity_within_one_percent(quality):
    assert quality["int8"]["change"] < 0.01, quality


def test_calibrated_int4_within_bound_and_beats_round_to_nearest(quality):
    int4, rtn = quality["int4"]["change"], quality["int4-rtn"]["change"]
    assert int4 < 0.15, quality
    assert int4 <= 0.5 * rtn, quality
