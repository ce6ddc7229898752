#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Builds a tiny Linux guest for the tests that need a real kernel (tests/linux_guest.rs):
#
#   scripts/build-linux-guest.sh OUT_DIR
#
# writes OUT_DIR/initramfs.img (cpio -H newc, gzip) holding a static busybox and an /init that
# mounts /proc and prints `counter N uptime S` on the console every 100 ms (N from 1, S the
# first field of /proc/uptime), and OUT_DIR/vmlinuz, a symlink to the newest installed Debian
# cloud kernel (/boot/vmlinuz-*-cloud-amd64). Boot it with
#
#   qemu-system-x86_64 -machine pc,accel=tcg -m 256 -nographic -no-reboot \
#     -kernel OUT_DIR/vmlinuz -initrd OUT_DIR/initramfs.img -append "console=ttyS0 quiet panic=-1"
#
# Needs the Debian packages linux-image-cloud-amd64, busybox-static and cpio. Idempotent: the
# same inputs give the same files (no timestamps inside), and each file is replaced atomically,
# so concurrent runs into one OUT_DIR are safe.
set -euo pipefail

die() {
  echo "build-linux-guest: $*" >&2
  exit 1
}

[ $# -eq 1 ] || die "usage: $0 OUT_DIR"
out=$1

kernel=$(ls -1 /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$kernel" ] && [ -r "$kernel" ] ||
  die "no readable /boot/vmlinuz-*-cloud-amd64: install the Debian package linux-image-cloud-amd64"

busybox=/bin/busybox
[ -x "$busybox" ] || die "no $busybox: install the Debian package busybox-static"
# The dynamically linked busybox (Debian package busybox) installs the same path but cannot run
# in an initramfs without its libraries.
has_interp() { # $1: an ELF64 little-endian file; true when a program header is PT_INTERP
  local phoff phentsize phnum i
  phoff=$(od -An -tu8 -j 32 -N 8 "$1" | tr -d ' ')
  phentsize=$(od -An -tu2 -j 54 -N 2 "$1" | tr -d ' ')
  phnum=$(od -An -tu2 -j 56 -N 2 "$1" | tr -d ' ')
  for ((i = 0; i < phnum; i++)); do
    [ "$(od -An -tu4 -j $((phoff + i * phentsize)) -N 4 "$1" | tr -d ' ')" = 3 ] && return 0
  done
  return 1
}
if has_interp "$busybox"; then
  die "$busybox is dynamically linked: install the Debian package busybox-static"
fi
command -v cpio >/dev/null || die "no cpio: install the Debian package cpio"
command -v gzip >/dev/null || die "no gzip: install the Debian package gzip"

mkdir -p "$out"
stage=$(mktemp -d "$out/.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT

mkdir -p "$stage/root/bin" "$stage/root/proc" "$stage/root/sys" "$stage/root/dev"
cp "$busybox" "$stage/root/bin/busybox"
ln -s busybox "$stage/root/bin/sh"
cat >"$stage/root/init" <<'INIT'
#!/bin/sh
# The test guest's init: a counter and the uptime on the console every 100 ms, forever.
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
# With no /dev/console in the archive the kernel starts us without stdio: take the console now.
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
n=0
while :; do
  n=$((n + 1))
  read -r up _ </proc/uptime
  echo "counter $n uptime $up"
  usleep 100000
done
INIT
chmod 0755 "$stage/root/init"

# Reproducible archive: sorted names, fixed times and owners.
find "$stage/root" -exec touch -h -d @0 {} +
(cd "$stage/root" && find . -mindepth 1 | LC_ALL=C sort |
  cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -9 -n >"$stage/initramfs.img"

mv -f "$stage/initramfs.img" "$out/initramfs.img"
ln -s "$kernel" "$stage/vmlinuz"
mv -Tf "$stage/vmlinuz" "$out/vmlinuz"
size=$(stat -c %s "$out/initramfs.img")
echo "build-linux-guest: $out/initramfs.img ($size bytes), $out/vmlinuz -> $kernel"
