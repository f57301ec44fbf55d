"""Builds llmcore's C++/CUDA extension (llmcore._C) with CMake + Ninja into build/.

    pip install torch==2.13.0                      # CPU machines (or your CUDA torch >= 2.11)
    pip install -e . --no-build-isolation          # uses the torch already installed

Environment: LLMCORE_CUDA=auto|0|1, LLMCORE_CUDA_ARCHS="80;90a", MAX_JOBS=N.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        try:
            import torch  # noqa: F401
        except ImportError:
            sys.exit("llmcore: torch must be installed before building (CPU: pip install torch==2.13.0), "
                     "then run: pip install -e . --no-build-isolation")
        build_dir = ROOT / "build"
        build_dir.mkdir(exist_ok=True)
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        cfg = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DLLMCORE_CUDA={os.environ.get('LLMCORE_CUDA', 'auto')}",
            f"-DLLMCORE_CUDA_ARCHS={os.environ.get('LLMCORE_CUDA_ARCHS', '80;90a')}",
            f"-DLLMCORE_VERSION={VERSION}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        subprocess.run(cfg, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "all", "-j", jobs], check=True)
        built = next(build_dir.glob("_C*.so"))
        out.parent.mkdir(parents=True, exist_ok=True)
        self.copy_file(str(built), str(out))
        summary = build_dir / "llmcore_build_summary.txt"
        if summary.exists():
            print(summary.read_text().strip(), file=sys.stderr)


setup(
    version=VERSION,
    ext_modules=[CMakeExtension("llmcore._C")],
    cmdclass={"build_ext": CMakeBuild},
)
