#!/usr/bin/env bash
# The Debian package as an operator gets it (CI runs this as root, with no
# systemd as PID 1): build it with cargo-deb, lint it (no lintian errors),
# install it with dpkg -i, check what it installed (the unit verifies, the
# conffile passes check-config, nothing was enabled or started), then remove
# it (the data stays) and purge it (the data goes).
# DEB_NO_BUILD=1 repackages the existing release binaries (cargo deb --no-build).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
target="${CARGO_TARGET_DIR:-$(pwd)/target}"

fail() { echo "FAIL: $*"; exit 1; }

if [ -n "${DEB_NO_BUILD:-}" ]; then
  cargo deb --no-build --strip
else
  # The one release build of the CI run: niced, the tests may run beside it.
  nice -n 10 cargo deb --locked --strip
fi
deb=$(ls -t "$target"/debian/sluice_*.deb | head -1)
echo "built $deb ($(du -h "$deb" | cut -f1))"
dpkg-deb --info "$deb" | sed -n '/Package:/,$p'
dpkg-deb --contents "$deb"

# Conffiles and maintainer scripts are what they claim to be.
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -qx /etc/sluice/sluice.toml ||
  fail "/etc/sluice/sluice.toml is not a conffile"

lintian --version
# Errors fail; warnings are printed for the record.
lintian --fail-on error --tag-display-limit 0 "$deb"
echo "lintian: no errors"

# The maintainer scripts as systemd would see them. CI has no systemd as
# PID 1, so the scripts' systemd branch runs here in a private mount
# namespace where /run/systemd/system exists, with systemctl and
# deb-systemd-invoke replaced by stubs that record their arguments.
ctl=$(mktemp -d)
trap 'rm -rf "$ctl"' EXIT
dpkg-deb -e "$deb" "$ctl/DEBIAN"
mkdir "$ctl/bin"
for c in systemctl deb-systemd-invoke; do
  printf '#!/bin/sh\necho "%s $*" >> %s/calls\n' "$c" "$ctl" > "$ctl/bin/$c"
  chmod +x "$ctl/bin/$c"
done
script_calls() { # which script + args; prints the systemd calls it made
  : > "$ctl/calls"
  unshare -m sh -c 'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system &&
    PATH="$1/bin:$PATH" "$1/DEBIAN/$2" "$3" "$4" >/dev/null' sh "$ctl" "$@"
  cat "$ctl/calls"
}
calls=$(script_calls postinst configure "")
echo "$calls" | grep -qx "systemctl --system daemon-reload" || fail "postinst (install) does not reload systemd: $calls"
calls=$(script_calls postinst configure 0.0.1)
echo "$calls" | grep -qx "systemctl --system daemon-reload" || fail "postinst (upgrade) does not reload systemd: $calls"
calls=$(script_calls prerm upgrade 0.1.1)
[ -z "$calls" ] || fail "prerm touches the service on upgrade: $calls"
calls=$(script_calls prerm remove "")
echo "$calls" | grep -qx "deb-systemd-invoke stop sluice.service" || fail "prerm remove does not stop sluice: $calls"
calls=$(script_calls postrm remove "")
echo "$calls" | grep -qx "systemctl --system daemon-reload" || fail "postrm remove does not reload systemd: $calls"
all=$(cat "$ctl"/DEBIAN/postinst "$ctl"/DEBIAN/prerm "$ctl"/DEBIAN/postrm)
if echo "$all" | grep -vE '^\s*(#|echo )' | grep -qE '(systemctl|deb-systemd-invoke)[^#]* (enable|start|restart|try-restart|reload-or-restart)\b'; then
  fail "a maintainer script enables or (re)starts the service"
fi
echo "maintainer scripts: daemon-reload on install, upgrade and remove; stop only on remove; never enable or start"

# A clean slate on a reused machine.
if dpkg-query -W -f='${Status}' sluice 2>/dev/null | grep -q installed; then
  dpkg --purge sluice
fi

dpkg -i "$deb"
for f in /usr/bin/sluice /usr/bin/sluice-loadgen /lib/systemd/system/sluice.service /etc/sluice/sluice.toml; do
  [ -e "$f" ] || fail "$f not installed"
done
out=$(systemd-analyze verify /lib/systemd/system/sluice.service 2>&1 || true)
[ -z "$out" ] || { echo "$out"; fail "systemd-analyze verify on the installed unit"; }
echo "systemd-analyze verify /lib/systemd/system/sluice.service: OK"
/usr/bin/sluice check-config --config /etc/sluice/sluice.toml
# Installation enables nothing and starts nothing.
[ ! -e /etc/systemd/system/multi-user.target.wants/sluice.service ] ||
  fail "installation enabled the service"
pgrep -f '^/usr/bin/sluice ' >/dev/null && fail "the installed sluice runs after installation" || true

# What the daemon leaves in its StateDirectory (DynamicUser: /var/lib/private
# with a /var/lib/sluice symlink) must survive removal and go with purge.
mkdir -p /var/lib/private/sluice/wal
echo data > /var/lib/private/sluice/wal/00000000000000000001.seg
ln -sfn private/sluice /var/lib/sluice
echo "# edited" >> /etc/sluice/sluice.toml

dpkg --remove sluice
[ ! -e /usr/bin/sluice ] || fail "/usr/bin/sluice left after remove"
[ ! -e /lib/systemd/system/sluice.service ] || fail "unit left after remove"
[ -f /var/lib/sluice/wal/00000000000000000001.seg ] || fail "remove deleted the data"
grep -q "# edited" /etc/sluice/sluice.toml || fail "remove deleted the edited conffile"
echo "remove: binaries and unit gone; data and config kept"

dpkg --purge sluice
[ ! -e /var/lib/private/sluice ] && [ ! -e /var/lib/sluice ] && [ ! -L /var/lib/sluice ] ||
  fail "purge left the data"
[ ! -e /etc/sluice/sluice.toml ] || fail "purge left the conffile"
echo "purge: data and config gone"
echo "deb-check: OK"
