#!/usr/bin/env bash
# The first run on a GPU machine, as it is: install what the image lacks from the carried wheels, then
# benchmarks/gpu_check.py (the smoke part first: every script end to end; then the speed table).
#
#     bash benchmarks/gpu_wheels.sh                 # beforehand, where the registry is: wheels into .whl/
#     bash benchmarks/gpu_run.sh                    # on the GPU machine, from anywhere in the checkout
#     bash benchmarks/gpu_run.sh --budget-s 540 --parts smoke 1     # gpu_check's own flags go through
#
# Options (the others are gpu_check.py's):
#   --wheels DIR     the wheels, DIR/*.whl and DIR/<group>/*.whl (default: .whl)
#   --site DIR       where they are installed, put first on PYTHONPATH (default: .whl/site, inside
#                    the checkout: a later call on the same machine finds it there)
#   --out DIR        gpu_check.json and gpu_check.md (rewritten after every benchmark), preflight.txt
#                    and logs.tar.gz (every command's output, at the end): four files, as the device
#                    tool brings back (default: $OUT if set, else runs/gpu_check)
#   --budget-s S     gpu_check's budget (default: 240 s: with the machine's start and the installs, a
#                    rerun still fits a 15-minute GPU lease; the command ends within --limit-s)
#   --limit-s S      hard limit on gpu_check's wall time, SIGTERM then SIGKILL 10 s later (default:
#                    budget + 30: gpu_check's own ending after its last part)
#   --install-only   install and stop (a first call that carries one group of wheels)
#   --dry-run        print what would be installed and run, change nothing
# The image's torch is never touched: a torch, triton or nvidia-* wheel is refused (exit 2), a wheel
# of a package the image (or an earlier install) already has is not installed, and pip runs with
# --no-index --no-deps --target: nothing is fetched, nothing is resolved, site-packages is unchanged.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CALLER=$PWD
absolute() { case $1 in /*) echo "$1" ;; *) echo "$CALLER/$1" ;; esac; }  # a path given: from the caller's folder
cd "$ROOT"
WHEELS=.whl
SITE=.whl/site
OUT_DIR=${OUT:-runs/gpu_check}
BUDGET=240
LIMIT=
INSTALL_ONLY=0
DRY_RUN=0
PASS=()
while [ $# -gt 0 ]; do
    case $1 in
        --wheels) WHEELS=$(absolute "$2"); shift 2 ;;
        --site) SITE=$(absolute "$2"); shift 2 ;;
        --out|--out-dir) OUT_DIR=$(absolute "$2"); shift 2 ;;
        --budget-s) BUDGET=$2; shift 2 ;;
        --limit-s) LIMIT=$2; shift 2 ;;
        --install-only) INSTALL_ONLY=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) PASS+=("$1"); shift ;;
    esac
done
LIMIT=${LIMIT:-$(python3 -c "print(int(float('$BUDGET')) + 30)")}
SITE_ABS=$(python3 -c "import os, sys; print(os.path.abspath(sys.argv[1]))" "$SITE")
export PYTHONPATH="$SITE_ABS${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

# the wheels: refuse the image's own stack, skip what is already importable by its distribution name
mapfile -t ALL < <(find "$WHEELS" -maxdepth 2 -type f -name '*.whl' -not -path "$SITE/*" 2>/dev/null | sort)
REFUSED=$(printf '%s\n' "${ALL[@]}" | awk -F/ '{print $NF}' | grep -iE '^(torch|torchvision|torchaudio|triton|nvidia)[-_]' || true)
if [ -n "$REFUSED" ]; then
    echo "error: $WHEELS holds wheels that would replace the image's CUDA build of torch: $(echo $REFUSED)" \
         "(delete them; benchmarks/gpu_wheels.sh never downloads them)" >&2
    exit 2
fi
NEEDED=()
for wheel in "${ALL[@]}"; do
    name=$(basename "$wheel" | cut -d- -f1)
    have=$(python3 -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name")
    if [ -n "$have" ]; then
        echo "have $name $have: $(basename "$wheel") not installed"
    else
        NEEDED+=("$wheel")
    fi
done
INSTALL=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE_ABS")
if [ ${#NEEDED[@]} -gt 0 ]; then
    echo "\$ ${INSTALL[*]} <${#NEEDED[@]} wheels>"
    printf '  %s\n' "${NEEDED[@]}"
    [ $DRY_RUN = 1 ] || "${INSTALL[@]}" "${NEEDED[@]}"
else
    echo "nothing to install (${#ALL[@]} wheels in $WHEELS, all present)"
fi
[ $INSTALL_ONLY = 1 ] && exit 0

LOGS=runs/gpu_run_logs  # in the checkout (runs/ is git-ignored): packed into OUT at the end
CHECK=(timeout --signal=TERM --kill-after=10 "$LIMIT" python3 benchmarks/gpu_check.py --budget-s "$BUDGET"
       --out-dir "$OUT_DIR" --logs-dir "$LOGS" "${PASS[@]}")
echo "\$ PYTHONPATH=$PYTHONPATH HF_HUB_OFFLINE=1 ${CHECK[*]}"
[ $DRY_RUN = 1 ] && exit 0
mkdir -p "$OUT_DIR"
rm -rf "$LOGS"
# what the image has: torch's build and devices, each dependency importable or not (gpu_check says it too)
python3 - > "$OUT_DIR/preflight.txt" 2>&1 <<'EOF' || true
import importlib, subprocess
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available {torch.cuda.is_available()}, "
      f"{torch.cuda.device_count()} device(s)")
try:
    print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip())
except (OSError, subprocess.SubprocessError) as error:
    print(f"nvidia-smi: {error}")
for name in ("numpy", "PIL", "cv2", "yaml", "tqdm", "scipy", "sklearn", "matplotlib", "monai", "kornia",
             "tensorboard", "submitit", "diffusers", "huggingface_hub", "safetensors"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} from {module.__file__}")
    except Exception as error:  # a broken install is reported, not fatal: gpu_check's rows say the rest
        print(f"{name}: {type(error).__name__}: {error}")
EOF
cat "$OUT_DIR/preflight.txt"
status=0
"${CHECK[@]}" || status=$?
tar -czf "$OUT_DIR/logs.tar.gz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")" 2>/dev/null || true
echo "gpu_check exit $status; table in $OUT_DIR/gpu_check.md, every command's output in $OUT_DIR/logs.tar.gz"
exit $status
