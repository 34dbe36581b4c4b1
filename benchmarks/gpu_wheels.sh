#!/usr/bin/env bash
# Here (CPU machine), from the repository root: the wheels that benchmarks/gpu_check.sh installs on the GPU
# machine, into the git-ignored .whl/ (about 44 MiB; a device call carries at most 64 MiB).
# - ../shared/device/fetch_wheels.sh: hivemind and its needs, bitsandbytes, hydra-core;
# - bitsandbytes keeps only the CUDA 13 and CPU libraries (the GPU machine's torch is cu130): 43 -> 13 MB;
# - transformers 5.25 (blocks take `cache=`; the machine's 5.17 takes `past_key_values=`) and the
#   huggingface_hub 2.x it needs. Not `kernels`: with it, transformers' nf4 loading asks the hub for kernels.
set -euo pipefail
bash ../shared/device/fetch_wheels.sh
bnb=$(ls .whl/bitsandbytes-*.whl)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && python3 -m zipfile -e "$OLDPWD/$bnb" . && rm -f bitsandbytes/libbitsandbytes_cuda1[12]*.so \
    bitsandbytes/libbitsandbytes_rocm*.so && rm "$OLDPWD/$bnb" && python3 -m zipfile -c "$OLDPWD/$bnb" ./*)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore tomlkit
du -sh .whl
