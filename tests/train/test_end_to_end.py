"""End-to-end on the bundled data: corpus -> tokenizer -> shards -> pretrain -> SFT -> held-out
questions. Asserts learning: held-out accuracy after SFT far above the untrained model's.
(scripts/quickstart.py with fewer steps and questions; it still runs in CI.)"""
import pytest

from scripts.quickstart import main

# Measured with these settings (2026-11-25, 60 questions): untrained 0.0%, after SFT 28.3%
# (unseen_template 40%, unseen_fact 17%); pretrain loss 7.29 -> 0.99, SFT loss 7.97 -> 0.67.
# The threshold keeps a ~2x margin below the measurement and stays far above the untrained 0%.
MIN_ACC_AFTER_SFT = 0.15


@pytest.mark.slow
def test_quickstart_learns(tmp_path):
    r = main(["--out", str(tmp_path), "--pretrain-steps", "200", "--sft-steps", "100", "--eval-questions", "60",
              "--no-progress"])  # the quickstart's defaults: ~460 s of CPU time on one core
    assert r["acc_untrained"] <= 0.05
    assert r["acc_sft"] >= MIN_ACC_AFTER_SFT, r
    assert r["acc_sft"] >= r["acc_untrained"] + 0.2
