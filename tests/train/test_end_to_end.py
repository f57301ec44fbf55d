"""End-to-end on the bundled data: corpus -> tokenizer -> shards -> pretrain -> SFT -> held-out
questions. Asserts learning: held-out accuracy after SFT far above the untrained model's.
(scripts/quickstart.py with fewer steps and questions; it still runs in CI.)"""
import pytest

from scripts.quickstart import main

# Measured (see the report / bench/RESULTS.md): untrained 0%, after SFT with these settings ~{ACC}%.
MIN_ACC_AFTER_SFT = 0.25


@pytest.mark.slow
def test_quickstart_learns(tmp_path):
    r = main(["--out", str(tmp_path), "--pretrain-steps", "200", "--sft-steps", "100", "--eval-questions", "60",
              "--no-progress"])
    assert r["acc_untrained"] <= 0.05
    assert r["acc_sft"] >= MIN_ACC_AFTER_SFT, r
    assert r["acc_sft"] >= r["acc_untrained"] + 0.2
