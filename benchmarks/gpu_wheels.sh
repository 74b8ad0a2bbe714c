#!/usr/bin/env bash
# Download, on a machine with the registry, the wheels a bare CUDA image (its own torch, numpy and
# pillow, python 3.12, x86_64 Linux) lacks to run this code base, into .whl/<group>/ (git-ignored):
#
#     bash benchmarks/gpu_wheels.sh            # then benchmarks/gpu_run.sh installs them on the GPU machine
#
# --no-deps, --only-binary: exactly the files listed here, for CPython 3.12 on manylinux x86_64; the
# list is the closure of requirements.txt's Requires-Dist (and diffusers') minus what torch itself
# needs (filelock, typing-extensions, setuptools, sympy, networkx, jinja2, markupsafe, fsspec) and
# numpy and pillow. Never torch, triton or nvidia-* (the image's CUDA build stays). The versions are
# those the tests pass with (opencv-python-headless 4.11: 13 MiB smaller than 5.x, numpy 1.26 or 2).
# Three groups, each under 60 MiB, so that each fits one carry of the lab's device tool (64 MiB):
#   cv    OpenCV alone (every script reads images with it)
#   sci   scikit-learn + SciPy (split.py, sample_ldm.py's two-sample test, reproduce.py's intervals)
#   run   matplotlib (curves.png), diffusers and its hub, kornia, MONAI, TensorBoard, submitit, PyYAML, tqdm
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; echo "usage: bash benchmarks/gpu_wheels.sh [DEST]  (default DEST: .whl)"; exit 0;;
  -*) echo "error: unknown option $1 (usage: bash benchmarks/gpu_wheels.sh [DEST])" >&2; exit 2;;
esac
DEST=${1:-.whl}
rm -rf "$DEST/cv" "$DEST/sci" "$DEST/run"  # exactly this list, nothing left from an earlier one

CV=(opencv-python-headless==4.11.0.86)
SCI=(scipy==1.17.1 scikit-learn==1.9.1 joblib==1.6.0 threadpoolctl==3.8.0 narwhals==2.29.0)
RUN=(matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1 pyparsing==3.3.2
     python-dateutil==2.9.0.post0 six==1.17.0
     diffusers==0.42.1 huggingface-hub==2.4.0 safetensors==0.8.0 regex==2026.5.9 importlib-metadata==10.2.0
     zipp==4.1.2 lazy-importer==0.1.0 click==8.5.1 httpx2==2.16.2 httpcore2==2.16.2 anyio==4.16.0 h11==0.16.0
     truststore==0.10.5 idna==3.20 requests==2.34.2 charset-normalizer==3.4.7 urllib3==2.7.0 certifi==2026.5.20
     packaging==26.2 pyyaml==6.0.3 tqdm==4.70.1
     kornia==0.9.0 kornia-rs==0.2.0 monai==1.6.1
     tensorboard==2.21.0 tensorboard-data-server==0.7.2 grpcio==1.85.3 protobuf==7.36.2 absl-py==2.5.1
     markdown==3.11.3 werkzeug==3.1.8
     submitit==1.5.4 cloudpickle==3.1.3)

fetch() {  # fetch GROUP SPEC...: each wheel for CPython 3.12 on manylinux x86_64, or pure Python
    local group=$1; shift
    mkdir -p "$DEST/$group"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$DEST/$group" "$@"
}

fetch cv "${CV[@]}"
fetch sci "${SCI[@]}"
fetch run "${RUN[@]}"

status=0
if ls "$DEST"/*/ | grep -iE '^(torch|triton|nvidia)[-_]' ; then
    echo "error: $DEST holds torch, triton or nvidia-* wheels: they would replace the GPU image's CUDA build" >&2
    status=2
fi
for group in cv sci run; do
    size=$(du -sm "$DEST/$group" | cut -f1)
    echo "$DEST/$group: $(ls "$DEST/$group" | wc -l) wheels, ${size} MiB"
    if [ "$size" -gt 60 ]; then
        echo "error: $DEST/$group is over 60 MiB: it does not fit one carry of the device tool" >&2
        status=2
    fi
done
exit $status
