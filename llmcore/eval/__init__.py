"""Evaluation: perplexity (llmcore.eval.perplexity) and multiple-choice accuracy on C-Eval/CMMLU
csv files (llmcore.eval.choice). A sample csv ships in llmcore/eval/data/."""
from pathlib import Path

SAMPLE_CSV = Path(__file__).with_name("data") / "sample_ceval.csv"
