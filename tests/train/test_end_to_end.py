"""End-to-end on the bundled data (scripts/quickstart.py with its defaults): corpus -> tokenizer ->
shards -> pretrain -> SFT -> DPO -> held-out questions, scored with the strict first-span rule.

Asserts learning beyond guessing, against baselines computed from the same data:
- the relation prior (each question answered with its relation's most common training answer), and
- the SFT-only control (the same SFT from a random init: the answer format and the answer
  distribution, no knowledge from pretraining).
`unseen_fact` questions ask about facts SFT never saw: only pretraining can teach them.
"""
import pytest

from scripts.quickstart import main

# Measured (2026-12-02, 2-core Intel Xeon shared with other jobs, load ~7, the defaults, 2 threads),
# held-out accuracy per split (120 questions each):
#   unseen_fact:     relation prior 12.5%, SFT-only control 15.8%, after SFT 32.5%, after DPO 27.5%
#   unseen_template: relation prior 20.8%, SFT-only control 20.8%, after SFT 55.0%, after DPO 51.7%
# (1 thread, same data: unseen_fact 38.3% after SFT, control 15.8%). Margins keep ~half the gaps.
MIN_UNSEEN_FACT_OVER_CONTROL = 0.10
MIN_UNSEEN_FACT_OVER_PRIOR_RATIO = 2.0
MIN_UNSEEN_TEMPLATE_OVER_CONTROL = 0.15


@pytest.mark.slow
def test_quickstart_learns_beyond_guessing(tmp_path):
    r = main(["--out", str(tmp_path), "--no-progress"])  # the quick start's defaults
    acc = r["by_split"]
    sft, prior, control = acc["after SFT"], acc["relation prior"], acc["SFT-only control"]
    assert acc["untrained"]["all"] <= 0.05, acc
    assert sft["unseen_fact"] >= MIN_UNSEEN_FACT_OVER_PRIOR_RATIO * prior["unseen_fact"], acc
    assert sft["unseen_fact"] >= control["unseen_fact"] + MIN_UNSEEN_FACT_OVER_CONTROL, acc
    assert sft["unseen_template"] >= control["unseen_template"] + MIN_UNSEEN_TEMPLATE_OVER_CONTROL, acc
    # DPO must not undo SFT (a gain is not yet reached: see the quick start's docstring)
    assert acc["after DPO"]["all"] >= sft["all"] - 0.08, acc  # measured -4.2 points (2 threads), -1.7 (1 thread)
