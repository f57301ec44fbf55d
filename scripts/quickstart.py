"""The README's main job. Until the training pipeline lands it runs the ops demo."""
import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).with_name("demo_ops.py")), run_name="__main__")
