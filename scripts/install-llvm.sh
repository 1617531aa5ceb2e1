#!/usr/bin/env bash
# Installs LLVM/MLIR 22 from Debian packages for loopc's MLIR backend (cargo feature `mlir`).
# melior 0.27 links MLIR 22 statically; these are the packages its build needs:
#   llvm-22-dev libmlir-22-dev  headers, static libraries and llvm-config of LLVM/MLIR 22
#   mlir-22-tools               mlir-opt-22 (the tests parse `loopc ir --stage mlir` with it)
#   libclang-22-dev clang-22    bindgen of mlir-sys
#   libpolly-22-dev             LLVM 22's llvm-config lists Polly among the libraries to link
#   libzstd-dev                 llvm-config asks for -lzstd
# Then build with:
#   export MLIR_SYS_220_PREFIX=/usr/lib/llvm-22 TABLEGEN_220_PREFIX=/usr/lib/llvm-22
#   cargo test -j2 --workspace --features mlir
# The prefixes are needed where another llvm-config (an older LLVM) is first on PATH.
set -euo pipefail

packages=(llvm-22-dev libmlir-22-dev mlir-22-tools libclang-22-dev clang-22 libpolly-22-dev libzstd-dev)

if [ -x /usr/lib/llvm-22/bin/llvm-config ] && [ -x /usr/lib/llvm-22/bin/mlir-opt ] \
  && dpkg -s "${packages[@]}" >/dev/null 2>&1; then
  echo "LLVM/MLIR 22 is already installed in /usr/lib/llvm-22"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show llvm-22-dev >/dev/null 2>&1; then
  $sudo apt-get update
fi
if ! apt-cache show llvm-22-dev >/dev/null 2>&1; then
  # Not in the distribution's own archive: add apt.llvm.org's repository for this release.
  codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
  $sudo apt-get install -y --no-install-recommends wget gnupg ca-certificates
  wget -qO- https://apt.llvm.org/llvm-snapshot.gpg.key | $sudo tee /etc/apt/trusted.gpg.d/apt.llvm.org.asc >/dev/null
  echo "deb http://apt.llvm.org/$codename/ llvm-toolchain-$codename-22 main" \
    | $sudo tee /etc/apt/sources.list.d/llvm-22.list >/dev/null
  $sudo apt-get update
fi
$sudo apt-get install -y --no-install-recommends "${packages[@]}"
/usr/lib/llvm-22/bin/llvm-config --version
