#!/usr/bin/env bash
# Builds a small bootable Linux guest from Debian packages only, for the guest tests
# (tests/guest) and scripts/bench_vm.py:
#
#   scripts/build_guest.sh            # prints the guest's directory on its last line of stdout
#
# The directory holds
#   vmlinux       Debian's linux-image-amd64 kernel (downloaded and extracted, never installed),
#                 decompressed to its ELF so that qemu boots it by PVH in half the time
#   initrd.gz     an initramfs built here: busybox, the modules the root needs, an /init that
#                 loads them and switch_roots into the ext4 on /dev/vda
#   root.qcow2    the root: an ext4 made with `mkfs.ext4 -d` (no loop mount) holding static
#                 busybox, /sbin/init (the checks below) and /data/seed (random) with its sha256
#   seed.sha256   that sha256 (the tests compare it with the guest's own check)
#   cmdline       the kernel command line to boot with
#
# The guest's init reads /data/seed and checks its sha256, writes /data/written (random,
# conv=fsync, then sync), reads it back after dropping its page cache, prints
#   BLIXFS-GUEST-OK <sha256 of /data/written>
# on the serial console (ttyS0) and powers off; any failed step prints
#   BLIXFS-GUEST-FAIL <reason>
# and powers off. Boot it with -no-reboot (a kernel panic then ends qemu too, panic=-1):
#   qemu-system-x86_64 -accel tcg -m 256 -nodefaults -display none -no-reboot -serial file:LOG \
#     -kernel DIR/vmlinux -initrd DIR/initrd.gz -append "$(cat DIR/cmdline)" \
#     -drive file=IMAGE.qcow2,if=virtio,format=qcow2
#
# Cached outside the repository, keyed by the sha256 of this script: a second run, or a
# fresh clone on the same machine, only prints the path. The cache is $BLIXFS_GUEST_CACHE,
# else /var/cache/blixfs-guest (root), else ${XDG_CACHE_HOME:-~/.cache}/blixfs-guest.
# Concurrent runs are serialised by a lock; a build is moved into place only when complete.
# A build removes the guests of other versions of this script not used for a week.
# Needs apt-get (to download), dpkg-deb, mkfs.ext4, qemu-img, cpio, gzip (scripts/install.sh).
set -euo pipefail

log() { printf '[build_guest] %s\n' "$*" >&2; }

# --- the guest's size: small, so that it builds in seconds and boots in seconds under TCG ---
SEED_MIB=8       # random data baked in; the guest reads all of it and checks its sha256
WRITE_MIB=4      # what the guest writes, fsyncs and reads back
ROOT_MIB=64      # the ext4's size (the qcow2 holds only what is used)
# Modules the root needs, in load order (dependencies first). In Debian 12's kernel all of
# these are modules (CONFIG_VIRTIO_BLK=m, CONFIG_EXT4_FS=m, ...); the dependency closure is
# checked below against each module's own depends= so a kernel update cannot silently break it.
# crc32c_generic: ext4's and jbd2's metadata checksums ask the crypto API for "crc32c" at
# mount time, and with no modprobe in the initramfs it must already be loaded.
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
         crc16 mbcache jbd2 crc32c_generic ext4)

script="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
key=$(sha256sum "$script" | cut -c1-16)
if [ -n "${BLIXFS_GUEST_CACHE:-}" ]; then
  cache=$BLIXFS_GUEST_CACHE
elif [ "$(id -u)" -eq 0 ]; then
  cache=/var/cache/blixfs-guest
else
  cache=${XDG_CACHE_HOME:-$HOME/.cache}/blixfs-guest
fi
out=$cache/$key
mkdir -p "$cache"

exec 9>"$cache/.lock"
flock 9  # another run building the same guest: wait for it, then use its result
if [ -f "$out/.complete" ]; then
  touch "$out"  # in use: not pruned below by a build of another version of this script
  log "cached: $out"
  echo "$out"
  exit 0
fi

for tool in apt-get dpkg-deb mkfs.ext4 qemu-img cpio gzip; do
  command -v "$tool" >/dev/null || { log "$tool missing: run scripts/install.sh"; exit 1; }
done

work=$(mktemp -d "$cache/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

# --- packages: downloaded into the build dir only ----------------------------------------
# A fresh machine may have no package lists yet, or stale ones (a download then 404s): both
# are fixed by one apt-get update (root), then the step is tried again.
resolve_kernel() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
download() {
  # apt drops to the _apt user to download; it cannot write here (a root-owned temp dir) and
  # then downloads as root with a warning: harmless, so the warning is filtered out.
  apt-get download -q "$kpkg" busybox-static 2>&1 | { grep -v 'unsandboxed as root' || true; } >&2
  return "${PIPESTATUS[0]}"
}
update_lists() {
  [ "$(id -u)" -eq 0 ] || { log "apt-get update needs root"; return 1; }
  log "apt-get update"
  apt-get update -qq >&2
}
kpkg=$(resolve_kernel || true)
if [ -z "$kpkg" ]; then
  update_lists
  kpkg=$(resolve_kernel || true)
fi
[ -n "$kpkg" ] || { log "cannot resolve linux-image-amd64 to a kernel package"; exit 1; }
log "downloading $kpkg busybox-static"
if ! download; then
  update_lists
  download
fi
ls ./linux-image-*.deb ./busybox-static_*.deb >/dev/null
dpkg-deb -x ./linux-image-*.deb kernel
dpkg-deb -x ./busybox-static_*.deb busybox
kver=$(ls kernel/lib/modules)
mods=kernel/lib/modules/$kver/kernel
# The kernel as an uncompressed ELF: qemu boots it through its PVH entry (CONFIG_PVH=y), which
# skips the bzImage's xz decompression, ~5 s of a ~10 s boot under TCG. It is the same kernel,
# only unpacked (python3's lzma: the xz stream inside the bzImage, trailing bytes ignored).
python3 - "kernel/boot/vmlinuz-$kver" vmlinux <<'PY'
import lzma, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit("no xz stream in the bzImage")
elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
if elf[:4] != b"\x7fELF":
    sys.exit("the xz stream is not an ELF kernel")
open(sys.argv[2], "wb").write(elf)
PY
bb=busybox/bin/busybox
[ -x "$bb" ] || { log "no static busybox in busybox-static"; exit 1; }

# --- initramfs ---------------------------------------------------------------------------
mkdir -p initrd/bin initrd/dev initrd/proc initrd/sys initrd/newroot initrd/lib/modules
cp "$bb" initrd/bin/busybox
loaded=" "
for m in "${MODULES[@]}"; do
  ko=$(find "$mods" -name "$m.ko" -print -quit)
  if [ -z "$ko" ]; then
    # Built into this kernel: nothing to load (modules.builtin lists it).
    grep -q "/$m.ko\$" "kernel/lib/modules/$kver/modules.builtin" || { log "module $m not in $kver"; exit 1; }
    loaded+="$m "
    continue
  fi
  # The module's own dependencies (its .modinfo "depends=") must be loaded before it.
  deps=$(tr '\0' '\n' < "$ko" | sed -n 's/^depends=//p' | head -1 | tr ',' ' ')
  for d in $deps; do
    case "$loaded" in *" $d "*) ;; *) log "module $m needs $d, not loaded before it in MODULES"; exit 1;; esac
  done
  cp "$ko" initrd/lib/modules/
  echo "$m" >> initrd/lib/modules/order
  loaded+="$m "
done

cat > initrd/init <<'EOF'
#!/bin/busybox sh
# The initramfs: load the modules the root needs, mount /dev/vda, switch_root into it.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs dev /dev
# The kernel found no /dev/console in this initramfs (no device nodes without mknod): take it now.
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys
fail() { echo "BLIXFS-GUEST-FAIL $*"; sync; poweroff -f; sleep 60; }
for m in $(cat /lib/modules/order); do
  insmod "/lib/modules/$m.ko" || fail "initramfs: insmod $m"
done
i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1)); [ "$i" -le 300 ] || fail "initramfs: no /dev/vda after 30 s"; sleep 0.1
done
mount -t ext4 /dev/vda /newroot || fail "initramfs: mount /dev/vda"
mount -o move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
EOF
chmod 755 initrd/init
(cd initrd && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -6 > initrd.gz

# --- root filesystem ---------------------------------------------------------------------
mkdir -p root/bin root/sbin root/dev root/proc root/sys root/tmp root/data
cp "$bb" root/bin/busybox
head -c "$((SEED_MIB << 20))" /dev/urandom > root/data/seed
sha256sum root/data/seed | cut -d' ' -f1 > seed.sha256
cp seed.sha256 root/data/seed.sha256
cat > root/sbin/init <<EOF
#!/bin/busybox sh
# The guest's checks: read, write + fsync, read back, report on the console, power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
fail() { echo "BLIXFS-GUEST-FAIL \$*"; sync; poweroff -f; sleep 60; }
echo "BLIXFS-GUEST-START"
[ "\$(sha256sum /data/seed | cut -d' ' -f1)" = "\$(cat /data/seed.sha256)" ] || fail "seed checksum mismatch"
dd if=/dev/urandom of=/data/written bs=1M count=$WRITE_MIB conv=fsync 2>/dev/null || fail "write"
sync || fail "sync"
sum=\$(sha256sum /data/written | cut -d' ' -f1)
# Read it back from the disk, not from the page cache it was written through.
echo 3 > /proc/sys/vm/drop_caches
[ "\$(sha256sum /data/written | cut -d' ' -f1)" = "\$sum" ] || fail "read back differs"
echo "BLIXFS-GUEST-OK \$sum"
sync
poweroff -f
sleep 60
EOF
chmod 755 root/sbin/init
# Reserved blocks 0 (-m 0): a test image needs no root reserve.
mkfs.ext4 -q -F -m 0 -L blixroot -d root root.raw "${ROOT_MIB}M" >&2  # it says "Creating regular file" on stdout
qemu-img convert -q -O qcow2 root.raw root.qcow2
rm root.raw

# The initramfs mounts the root itself (read-write); root= only documents it.
echo "console=ttyS0 root=/dev/vda quiet panic=-1" > cmdline
echo "$kpkg $kver busybox $("$bb" 2>&1 | head -1 | cut -d' ' -f2)" > versions

mkdir -p "$out.new"
rm -rf "${out:?}.new"/*
mv vmlinux initrd.gz root.qcow2 seed.sha256 cmdline versions "$out.new"/
touch "$out.new/.complete"
rm -rf "$out"
mv "$out.new" "$out"
# Guests of other versions of this script (other branches, older commits) unused for a week.
find "$cache" -mindepth 1 -maxdepth 1 -type d \( -name '[0-9a-f]*' -o -name '.build-*' \) ! -path "$out" ! -path "$work" \
  -mtime +7 -exec rm -rf {} + || true  # (and builds killed before their trap ran)
log "built: $out ($(du -sh "$out" | cut -f1): $(cat "$out/versions"))"
echo "$out"
