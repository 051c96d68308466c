"""What the lent H200's image holds, and what the GPU check carries there as wheels.

One list for three readers: `benchmarks/gpu_wheels.sh` (what to download or build), the completeness
check `benchmarks/gpu_wheels_check.py`, and the dry run's import guard (`benchmarks/device_sim`), which
hides from the project's venv every package that the device would not have.

    python benchmarks/gpu_packages.py pins       # NAME==VERSION of each binary wheel to download
    python benchmarks/gpu_packages.py built      # NAME==VERSION of each wheel built from its sdist
    python benchmarks/gpu_packages.py roots      # what the GPU run imports (the resolver's roots)

Versions are the ones installed in the interpreter that runs this (the project's venv: the set the
test suite runs against), so the device runs what was tested here, apart from torch and the image's own.
"""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.utils import canonicalize_name

# The image's Python packages as read on the machine (2026-11-17); its python3 is 3.12 with torch 2.11.
IMAGE_PACKAGES = frozenset(canonicalize_name(name) for name in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

# Versions read there (the others were not reported; the completeness check assumes the venv's).
IMAGE_VERSIONS = {"torch": "2.11.0", "torchvision": "0.26.0", "triton": "3.6.0", "numpy": "2.5.2",
                  "safetensors": "0.8.0", "accelerate": "1.15.0", "huggingface-hub": "1.33.0"}

# What the GPU run imports beyond the image: the training engine, the job spec, the shard reader and
# the MLflow client with a sqlite store (mlflow-skinny: full mlflow adds the server, Flask and friends).
# Ray is not carried (its wheel alone is over the 64 MiB a call may carry): the chain runs under torchrun.
ROOTS = ("deepspeed", "pydantic", "webdataset", "simplejpeg", "mlflow-skinny", "sqlalchemy", "alembic")

# Built here from the sdist (`pip wheel --no-deps`): DeepSpeed publishes no wheel.
BUILT = ("deepspeed",)

# Downloaded as cp312 manylinux (or pure-Python) wheels: the ROOTS' dependency closure minus the image.
# typing-extensions and certifi are in the image too, but pydantic needs typing-extensions >= 4.16 and
# databricks-sdk certifi >= 2026.10: carried so an older copy in the image cannot break the import.
CARRIED = (
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
    "webdataset", "braceexpand", "hjson", "simplejpeg",
    "mlflow-skinny", "cachetools", "databricks-sdk", "google-auth", "pyasn1", "pyasn1-modules", "cryptography",
    "cffi", "pycparser", "certifi", "fastapi", "starlette", "uvicorn", "gitpython", "gitdb", "smmap",
    "importlib-metadata", "opentelemetry-api", "opentelemetry-sdk", "opentelemetry-proto",
    "opentelemetry-semantic-conventions", "python-dotenv", "sqlparse",
    "sqlalchemy", "alembic", "mako",
)


def pin(name: str) -> str:
    try:
        return f"{name}=={metadata.version(name)}"
    except metadata.PackageNotFoundError:
        raise SystemExit(f"gpu_packages: {name} is not installed in {sys.executable}; run `make setup`") from None


def main(argv: list[str]) -> int:
    lists = {"pins": [pin(n) for n in CARRIED], "built": [pin(n) for n in BUILT], "roots": list(ROOTS)}
    if len(argv) != 1 or argv[0] not in lists:
        print(f"usage: python benchmarks/gpu_packages.py {{{'|'.join(lists)}}}", file=sys.stderr)
        return 2
    print("\n".join(lists[argv[0]]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
