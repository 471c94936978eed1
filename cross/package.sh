#!/usr/bin/env bash
# Packs a built edgegen into target/dist/edgegen-<version>-<target>.tar.gz: the binary, the
# default configuration, the systemd unit, the bundled models and the install notes.
#
#   cross/package.sh TARGET        after `cross/build.sh TARGET` (or `cargo build --release`
#                                  for the host target, x86_64-unknown-linux-gnu)
set -euo pipefail

target=${1:?"usage: cross/package.sh TARGET"}
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
binary=target/$target/release/edgegen
host=$(rustc -vV | sed -n 's/^host: //p')
if [[ ! -x $binary && $target == "$host" ]]; then
    binary=target/release/edgegen
fi
if [[ ! -x $binary ]]; then
    echo "cross/package.sh: $binary not found; run cross/build.sh $target first" >&2
    exit 1
fi

name=edgegen-$version-$target
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
root=$staging/$name
mkdir -p "$root/bin" "$root/config" "$root/systemd"
install -m 0755 "$binary" "$root/bin/edgegen"
install -m 0644 config/edgegen.toml "$root/config/edgegen.toml"
install -m 0644 cross/edgegen.service "$root/systemd/edgegen.service"
install -m 0644 cross/README.md "$root/README.md"
cp -r models "$root/models"
# Reproducible archive: fixed owner, order and times.
mkdir -p target/dist
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='2000-01-01 00:00Z' \
    -C "$staging" -czf "target/dist/$name.tar.gz" "$name"
echo "target/dist/$name.tar.gz"
