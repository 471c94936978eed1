#!/usr/bin/env bash
# Builds edgegen for an ARM board on a plain Debian 12 machine, without Docker,
# and runs target binaries (tests, the CLI) under qemu-user.
#
#   cross/build.sh TARGET                  release build of the edgegen binary
#   cross/build.sh TARGET test [ARGS...]   any cargo command, e.g. the test suite under qemu
#   cross/build.sh TARGET run -- doctor    runs the target binary under qemu
#
# TARGET: aarch64-unknown-linux-gnu (Pi 3/4/5, Pi Zero 2 and Jetson on a 64-bit OS)
#         armv7-unknown-linux-gnueabihf (32-bit Raspberry Pi OS)
# Environment:
#   QEMU_CPU           CPU model qemu emulates (default: cortex-a72 on aarch64, i.e. a
#                      Pi 4; cortex-a7 on armv7). Never qemu's default `max`: it has SVE,
#                      and tract would pick SVE kernels no Raspberry Pi has.
#   TARGET_CPU         rustc -C target-cpu (default: none, i.e. the generic baseline that
#                      runs on every board of the target; see cross/README.md)
#   NO_INSTALL=1       skip the apt-get / rustup step (packages already there)
# (Not EDGEGEN_*: edgegen reads every EDGEGEN_* variable as configuration.)
set -euo pipefail

target=${1:?"usage: cross/build.sh TARGET [cargo command and arguments]"}
shift
cd "$(dirname "$0")/.."

case "$target" in
    aarch64-unknown-linux-gnu)
        gnu=aarch64-linux-gnu
        packages=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)
        qemu=qemu-aarch64
        loader=ld-linux-aarch64.so.1
        qemu_cpu=${QEMU_CPU:-cortex-a72}
        run_env=()
        ;;
    armv7-unknown-linux-gnueabihf)
        gnu=arm-linux-gnueabihf
        packages=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross qemu-user)
        qemu=qemu-arm
        loader=ld-linux-armhf.so.3
        qemu_cpu=${QEMU_CPU:-cortex-a7}
        # tract reads NEON support from /proc/cpuinfo, which under qemu-user is the
        # host's: without this it would run the plain VFP kernels.
        run_env=(env TRACT_CPU_ARM32_NEON=true)
        ;;
    *)
        echo "cross/build.sh: unsupported target '$target'" \
            "(aarch64-unknown-linux-gnu or armv7-unknown-linux-gnueabihf)" >&2
        exit 2
        ;;
esac

install_toolchain() {
    local missing=()
    for package in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$package")
    done
    if ((${#missing[@]})); then
        local sudo=()
        [[ $(id -u) -eq 0 ]] || sudo=(sudo)
        "${sudo[@]}" apt-get update
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends \
            "${missing[@]}"
    fi
    rustup target list --installed | grep -qx "$target" || rustup target add "$target"
}

[[ ${NO_INSTALL:-} == 1 ]] || install_toolchain

# qemu needs the target's dynamic loader and libc. The multiarch libc (libc6:arm64,
# installed with the Debian rustc route) lives under / and must be used alone: mixing it
# with the cross libc under /usr/<gnu> hangs the loader. Without it, use the cross libc.
if [[ -e /lib/$loader ]]; then
    sysroot=/
else
    sysroot=/usr/$gnu
fi

triple=$(echo "$target" | tr 'a-z-' 'A-Z_')
export "CARGO_TARGET_${triple}_LINKER=${gnu}-gcc"
export "CARGO_TARGET_${triple}_RUNNER=${run_env[*]} $qemu -cpu $qemu_cpu -L $sysroot"
# tract-linalg assembles its kernels with the C cross compiler (cc crate).
export "CC_${target//-/_}=${gnu}-gcc"
export "AR_${target//-/_}=${gnu}-ar"
if [[ -n ${TARGET_CPU:-} ]]; then
    export "CARGO_TARGET_${triple}_RUSTFLAGS=-C target-cpu=${TARGET_CPU}"
fi

if (($# == 0)); then
    set -- build --release --locked --bin edgegen
fi
command=$1
shift
echo "cross/build.sh: cargo $command --target $target $*" \
    "(runner: $(printenv "CARGO_TARGET_${triple}_RUNNER"))" >&2
# --target goes right after the command, before any `--` that starts the program's arguments.
exec cargo "$command" --target "$target" "$@"
