#!/usr/bin/env bash
# Install the CXR appliance on a Debian/Ubuntu/JetPack machine with systemd. Safe to run twice:
# existing configuration, passwords, keys and certificates are never overwritten.
#
#   sudo tools/install.sh [--site WARD] [--device-id CART] [--broker-name HOST]...
#   sudo tools/install.sh --offline cxr-appliance-VERSION-bundle.tar.gz ...   (no network: tools/deploy/bundle.py)
#
# For CI and staging, --root DIR installs everything below DIR (etc/, var/lib/, opt/) with paths
# pointing into DIR, creates no system user and changes no ownership; --no-systemctl leaves
# systemd, udev and the running broker alone. Run with --help for all options.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: tools/install.sh [options]
  --root DIR          install below DIR instead of / (no user creation, no chown)
  --prefix DIR        application folder (default: ROOT/opt/cxr-appliance)
  --site NAME         site/ward, first topic level (default: site)
  --device-id NAME    this cart's id and its broker account (default: cart-1)
  --broker-name NAME  extra DNS name or IP for the broker certificate (repeatable)
  --python PY         interpreter for the venv (default: python3)
  --skip-venv         do not create the venv / pip install (the app must already be importable by --python)
  --pip-args ARGS     extra arguments for pip install (e.g. "--no-index --find-links /media/wheels")
  --offline BUNDLE    install from a bundle written by tools/deploy/bundle.py, with no network: every file's
                      sha256 is checked first, then the venv gets the bundle's wheels for this machine
  --no-systemctl      do not run systemctl, udevadm or systemd-sysusers
  --skip-doctor       do not run `cxr-appliance doctor` at the end
  -h, --help          this text
EOF
}

ROOT=""
PREFIX=""
SITE="site"
DEVICE_ID="cart-1"
BROKER_NAMES=()
PYTHON="python3"
SKIP_VENV=0
PIP_ARGS=""
NO_SYSTEMCTL=0
SKIP_DOCTOR=0
OFFLINE=""

while [[ $# -gt 0 ]]; do
  case "$1" in
    --root) ROOT="${2:?--root needs a folder}"; shift 2 ;;
    --prefix) PREFIX="${2:?--prefix needs a folder}"; shift 2 ;;
    --site) SITE="${2:?}"; shift 2 ;;
    --device-id) DEVICE_ID="${2:?}"; shift 2 ;;
    --broker-name) BROKER_NAMES+=("${2:?}"); shift 2 ;;
    --python) PYTHON="${2:?}"; shift 2 ;;
    --skip-venv) SKIP_VENV=1; shift ;;
    --pip-args) PIP_ARGS="${2:-}"; shift 2 ;;
    --no-systemctl) NO_SYSTEMCTL=1; shift ;;
    --skip-doctor) SKIP_DOCTOR=1; shift ;;
    --offline) OFFLINE="${2:?--offline needs a bundle archive}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "install.sh: error: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }
# Temporary files and folders, removed however the script ends.
CLEANUP=()
cleanup() { if ((${#CLEANUP[@]})); then rm -rf -- "${CLEANUP[@]}"; fi; }
trap cleanup EXIT

[[ "$SITE" =~ ^[A-Za-z0-9_-]+$ ]] || die "--site '$SITE': use letters, digits, '-' and '_' only"
[[ "$DEVICE_ID" =~ ^[A-Za-z0-9_-]+$ ]] || die "--device-id '$DEVICE_ID': use letters, digits, '-' and '_' only"
[[ "$DEVICE_ID" != display* ]] || die "--device-id '$DEVICE_ID': names starting with 'display' are reserved for display accounts"

if [[ -n "$ROOT" ]]; then
  mkdir -p "$ROOT"
  ROOT="$(cd "$ROOT" && pwd)"
  [[ "$ROOT" != "/" ]] || ROOT=""
fi
STAGED=0
[[ -n "$ROOT" ]] && STAGED=1
if [[ $STAGED -eq 0 && $EUID -ne 0 ]]; then
  die "run as root (sudo), or use --root DIR --no-systemctl for an unprivileged staging install"
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${PREFIX:-$ROOT/opt/cxr-appliance}"
ETC="$ROOT/etc/cxr-appliance"
SECRETS="$ETC/secrets"
STATE="$ROOT/var/lib/cxr-appliance"
MOSQ="$ROOT/etc/mosquitto"
UNITS="$ROOT/etc/systemd/system"
UDEV="$ROOT/etc/udev/rules.d"
SYSUSERS="$ROOT/etc/sysusers.d"

for tool in openssl; do  # broker password hashes are written by the appliance itself (no argv)
  command -v "$tool" >/dev/null || die "$tool not found: apt-get install openssl mosquitto"
done

# --- 0. an offline bundle: check every file, then install from it as from a checkout ----------
COPY_EXCLUDES=()
WHEELS=""
if [[ -n "$OFFLINE" ]]; then
  [[ $SKIP_VENV -eq 0 ]] || die "--offline installs the venv from the bundle's wheels: leave out --skip-venv"
  [[ -f "$OFFLINE" ]] || die "--offline $OFFLINE: no such file"
  UNPACKED="$(mktemp -d "${TMPDIR:-/tmp}/cxr-bundle.XXXXXX")"
  CLEANUP+=("$UNPACKED")
  say "checking the bundle $OFFLINE"
  # Prints the bundle's top folder and this machine's wheel folder, or refuses and names the file.
  CHECKED="$("$PYTHON" - "$OFFLINE" "$UNPACKED" <<'PY'
import hashlib
import json
import platform
import sys
import tarfile
from pathlib import Path

archive, dest = Path(sys.argv[1]), Path(sys.argv[2])


def refuse(message):
    sys.exit(f"install.sh: error: bundle {archive}: {message}")


def sha256(path):
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# The .sha256 written beside the archive, if it travelled with it, covers BUNDLE.json too.
sidecar = archive.with_name(archive.name + ".sha256")
if sidecar.is_file() and sidecar.read_text().split()[:1] != [sha256(archive)]:
    refuse(f"its sha256 differs from {sidecar.name}: the archive was changed or damaged")
try:
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        tops = {m.name.split("/")[0] for m in members}
        for m in members:
            if m.name.startswith("/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
                refuse(f"unsafe entry {m.name!r}: a bundle holds only plain files and folders")
        if len(tops) != 1:
            refuse("expected one top folder")
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **safe)
except (tarfile.TarError, OSError, EOFError) as exc:
    refuse(f"not a readable archive ({exc})")
top = dest / tops.pop()
try:
    manifest = json.loads((top / "BUNDLE.json").read_text())
    files, targets = manifest["files"], manifest["targets"]
except (OSError, ValueError, KeyError) as exc:
    refuse(f"no valid BUNDLE.json ({exc})")
present = {str(p.relative_to(top)) for p in top.rglob("*") if p.is_file()} - {"BUNDLE.json"}
for name in sorted(present - set(files)):
    refuse(f"{name} is not listed in BUNDLE.json: the bundle was changed; do not install it")
for name, digest in sorted(files.items()):
    if name not in present:
        refuse(f"{name} is listed in BUNDLE.json but missing")
    if sha256(top / name) != digest:
        refuse(f"{name} does not match its sha256 in BUNDLE.json: the bundle was changed or damaged; do not install it")
machine, python = platform.machine(), "%d.%d" % sys.version_info[:2]
for target in targets.values():
    if (target["machine"], target["python"]) == (machine, python):
        print(top)
        print(top / target["wheels"])
        break
else:
    have = ", ".join(f"{t['machine']} with Python {t['python']}" for t in targets.values())
    refuse(
        f"no wheels for this machine: {machine} with Python {python} ({sys.executable}); the bundle has {have}."
        " Use --python for another interpreter, or build a bundle for this machine with tools/deploy/bundle.py"
    )
PY
)" || die "the bundle was refused, nothing was installed"
  { read -r REPO; read -r WHEELS; } <<<"$CHECKED"
  COPY_EXCLUDES=(--exclude=./wheels)  # the venv gets them; the application folder does not need them
  say "bundle verified: $(wc -l <"$WHEELS/requirements.txt") wheel pins for $(uname -m) in $WHEELS"
fi

# Ownership only on a real install; a staging tree belongs to whoever ran the script.
own() { [[ $STAGED -eq 1 ]] || chown "$1" "${@:2}"; }
group_exists() { getent group "$1" >/dev/null 2>&1; }
MOSQ_GROUP="mosquitto"
group_exists "$MOSQ_GROUP" || MOSQ_GROUP="root"

# --- 1. the account -------------------------------------------------------------------------
install -d -m 0755 "$SYSUSERS"
install -m 0644 "$REPO/systemd/cxr-appliance.sysusers.conf" "$SYSUSERS/cxr-appliance.conf"
if [[ $STAGED -eq 0 ]]; then
  if command -v systemd-sysusers >/dev/null; then
    systemd-sysusers "$SYSUSERS/cxr-appliance.conf"
  elif ! id cxr >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/cxr-appliance --shell /usr/sbin/nologin cxr
  fi
  group_exists video && usermod -a -G video cxr
fi

# --- 2. folders -------------------------------------------------------------------------------
install -d -m 0755 "$PREFIX"
install -d -m 0750 "$ETC" "$SECRETS" "$STATE" "$STATE/inbox" "$STATE/spool"
own root:cxr "$ETC" "$SECRETS"
own cxr:cxr "$STATE" "$STATE/inbox" "$STATE/spool"

# --- 3. the application and its venv -------------------------------------------------------
if [[ "$(cd "$PREFIX" && pwd)" != "$REPO" ]]; then
  # Source, model folders and tools; never the developer's venv, caches or git history.
  tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude='__pycache__' --exclude=./.mypy_cache \
      --exclude=./.pytest_cache --exclude=./.ruff_cache --exclude='*.egg-info' --exclude=./build \
      --exclude='./engines/*/cache' --exclude='./engines/*/checkpoints' --exclude=./dist --exclude=./var \
      ${COPY_EXCLUDES[@]+"${COPY_EXCLUDES[@]}"} -cf - . \
    | tar -C "$PREFIX" -xf -
fi
if [[ $SKIP_VENV -eq 0 ]]; then
  # Offline, the venv is rebuilt to hold exactly the bundle: nothing left over from an older one.
  [[ -z "$OFFLINE" ]] || rm -rf "$PREFIX/.venv"
  if [[ ! -x "$PREFIX/.venv/bin/python" ]]; then
    # System site packages: on a Jetson, TensorRT's Python bindings come from JetPack, not pip.
    "$PYTHON" -m venv --system-site-packages "$PREFIX/.venv"
  fi
  if [[ -n "$OFFLINE" ]]; then
    # Only the bundle's wheels, each pinned, all inside the venv (--ignore-installed): the versions the
    # bundle was built with, whatever the OS's site-packages hold or an apt upgrade later changes.
    # shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
    "$PREFIX/.venv/bin/pip" install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" \
      --ignore-installed $PIP_ARGS -r "$WHEELS/requirements.txt"
  else
    # The locked versions, every wheel checked against its sha256 in the lock, then the appliance itself
    # without resolving again: the cart runs what the tests ran.
    # shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
    "$PREFIX/.venv/bin/pip" install --quiet $PIP_ARGS --require-hashes -r "$PREFIX/requirements/runtime.lock"
    # shellcheck disable=SC2086
    "$PREFIX/.venv/bin/pip" install --quiet $PIP_ARGS --no-deps "$PREFIX"
  fi
  APP_PY="$PREFIX/.venv/bin/python"
else
  APP_PY="$PYTHON"
fi

# --- 4. broker secrets: passwords, CA, server certificate ------------------------------------
new_password() { openssl rand -base64 24 | tr -d '/+=\n' | cut -c1-24; }

install -d -m 0755 "$MOSQ" "$MOSQ/conf.d"
install -d -m 0750 "$MOSQ/certs"
own "root:$MOSQ_GROUP" "$MOSQ/certs"
PASSWD="$MOSQ/cxr.passwd"
ACL="$MOSQ/cxr.acl"
if [[ ! -f "$ACL" ]]; then
  sed -e "s/SITE/$SITE/g" -e "s/DEVICE/$DEVICE_ID/g" "$REPO/systemd/mosquitto/cxr.acl.example" >"$ACL"
  say "wrote $ACL"
fi
[[ -f "$PASSWD" ]] || (umask 027 && : >"$PASSWD")
# Hashes are written by the appliance's own code, the password read from stdin: never on any argv.
ACCOUNTS=("$APP_PY" -m appliance.cli display-account)
CART_SECRET="$SECRETS/mqtt-cart.password"
created=0
if [[ ! -s "$CART_SECRET" ]]; then
  (umask 077 && new_password >"$CART_SECRET")
  created=1
  say "created password for broker account '$DEVICE_ID' in $CART_SECRET"
fi
# A new secret always goes into the password file; an existing entry is left as it is.
if [[ $created -eq 1 ]] || ! grep -q "^${DEVICE_ID}:" "$PASSWD"; then
  "$APP_PY" -c 'import sys; from pathlib import Path; from appliance.display.accounts import set_password
set_password(Path(sys.argv[1]), sys.argv[2], sys.stdin.readline().strip())' "$PASSWD" "$DEVICE_ID" <"$CART_SECRET"
fi
# The shared `display` account of older installs: its password was served to every browser. Gone.
if grep -q "^display:" "$PASSWD" || grep -qx "user display" "$ACL"; then
  "${ACCOUNTS[@]}" revoke display --passwd "$PASSWD" --acl "$ACL" >/dev/null
  rm -f "$SECRETS/mqtt-display.password"
  say "removed the old shared broker account 'display': give each display its own (cxr-appliance display-account add)"
fi
# This cart's own screen (kiosk browser) is one per-display account like any other.
KIOSK_SECRET="$SECRETS/mqtt-display-kiosk.password"
if [[ ! -s "$KIOSK_SECRET" ]] || ! grep -q "^display-kiosk:" "$PASSWD" || ! grep -qx "user display-kiosk" "$ACL"; then
  "${ACCOUNTS[@]}" add kiosk --site "$SITE" --passwd "$PASSWD" --acl "$ACL" --password-file "$KIOSK_SECRET" >/dev/null
  say "created broker account 'display-kiosk' (reads $SITE, acknowledges as itself) with its password in $KIOSK_SECRET"
fi
chmod 0640 "$CART_SECRET" "$KIOSK_SECRET" "$PASSWD" "$ACL"
own root:cxr "$CART_SECRET" "$KIOSK_SECRET"
own "root:$MOSQ_GROUP" "$PASSWD" "$ACL"

# The CA key is root's alone (not in the service's secrets/): a compromised service cannot mint
# certificates. Older installs kept it in secrets/; it moves once.
CA_DIR="$ETC/ca-private"
install -d -m 0700 "$CA_DIR"
own root:root "$CA_DIR"
CA_KEY="$CA_DIR/cxr-ca.key"
[[ -s "$SECRETS/cxr-ca.key" && ! -e "$CA_KEY" ]] && mv "$SECRETS/cxr-ca.key" "$CA_KEY"
CA_CRT="$MOSQ/certs/cxr-ca.crt"
SRV_KEY="$MOSQ/certs/cxr-server.key"
SRV_CRT="$MOSQ/certs/cxr-server.crt"
# The names the broker answers to. The CA is name-constrained to exactly these: a ward that trusts it
# trusts it for this cart's broker, never for another host, even if its key were stolen.
HOST="$(hostname 2>/dev/null || echo cxr-cart)"
SAN="DNS:localhost,IP:127.0.0.1,IP:::1,DNS:$HOST"
[[ "$HOST" == *.* ]] || SAN="$SAN,DNS:$HOST.local"
for name in "${BROKER_NAMES[@]}"; do
  if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then SAN="$SAN,IP:$name"; else SAN="$SAN,DNS:$name"; fi
done
PERMITTED=()
IFS=, read -ra SAN_PARTS <<<"$SAN"
for part in "${SAN_PARTS[@]}"; do
  case "$part" in
    IP:*:*) PERMITTED+=("IP:${part#IP:}/ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff") ;;
    IP:*) PERMITTED+=("IP:${part#IP:}/255.255.255.255") ;;
    *) PERMITTED+=("$part") ;;
  esac
done
NAME_CONSTRAINTS="critical$(printf ',permitted;%s' "${PERMITTED[@]}")"
CA_NAMES="$CA_DIR/cxr-ca.names"  # the constraints our CA was made with
ca_is_ours() {  # a CA from the hospital's PKI (its key elsewhere) is never replaced
  [[ -s "$CA_KEY" ]] && [[ "$(openssl pkey -in "$CA_KEY" -pubout 2>/dev/null)" == "$(openssl x509 -in "$CA_CRT" -noout -pubkey 2>/dev/null)" ]]
}
if [[ ! -s "$CA_KEY" || ! -s "$CA_CRT" ]] || { ca_is_ours && [[ "$(cat "$CA_NAMES" 2>/dev/null)" != "$NAME_CONSTRAINTS" ]]; }; then
  [[ -s "$CA_CRT" ]] && say "our CA is not constrained to $SAN: making a new one; wards must trust the new $ETC/ca.crt"
  rm -f "$CA_KEY"
  (umask 077 && openssl ecparam -name prime256v1 -genkey -noout -out "$CA_KEY")
  openssl req -x509 -new -key "$CA_KEY" -sha256 -days 3650 -subj "/O=CXR appliance/CN=CXR appliance CA $SITE $DEVICE_ID" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "nameConstraints=$NAME_CONSTRAINTS" -out "$CA_CRT"
  printf '%s' "$NAME_CONSTRAINTS" >"$CA_NAMES"
  rm -f "$SRV_CRT"  # a new CA invalidates the old server certificate
  say "created a self-signed CA constrained to $SAN: $CA_CRT"
fi
if [[ ! -s "$SRV_KEY" || ! -s "$SRV_CRT" ]]; then
  [[ -s "$SRV_KEY" ]] || (umask 077 && openssl ecparam -name prime256v1 -genkey -noout -out "$SRV_KEY")
  CSR="$(mktemp)"
  EXT="$(mktemp)"
  CLEANUP+=("$CSR" "$EXT")
  openssl req -new -key "$SRV_KEY" -subj "/O=CXR appliance/CN=$HOST" -out "$CSR"
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$SAN" >"$EXT"
  openssl x509 -req -in "$CSR" -CA "$CA_CRT" -CAkey "$CA_KEY" -CAcreateserial -days 825 -sha256 \
    -extfile "$EXT" -out "$SRV_CRT" 2>/dev/null
  rm -f "$CSR" "$EXT" "$MOSQ/certs/cxr-ca.srl"
  say "created the broker certificate for $SAN"
fi
chmod 0600 "$CA_KEY"
own root:root "$CA_KEY"
chmod 0644 "$CA_CRT" "$SRV_CRT"
chmod 0640 "$SRV_KEY"
own "root:$MOSQ_GROUP" "$SRV_KEY"
install -m 0644 "$CA_CRT" "$ETC/ca.crt"  # the appliance and displays verify the broker with it

# The broker drop-in, paths pointing into ROOT for a staging install.
sed -e "s#/etc/mosquitto/#$MOSQ/#g" "$REPO/systemd/mosquitto/cxr.conf" >"$MOSQ/conf.d/cxr.conf.new"
mv "$MOSQ/conf.d/cxr.conf.new" "$MOSQ/conf.d/cxr.conf"
install -m 0644 "$REPO/systemd/mosquitto/bridge-hospital.conf.example" "$MOSQ/bridge-hospital.conf.example"

# --- 5. the appliance configuration ----------------------------------------------------------
CONFIG="$ETC/config.yaml"
if [[ ! -f "$CONFIG" ]]; then
  # Start from the repository's documented example and set only what this install decides.
  "$APP_PY" - "$REPO/config/example.yaml" "$CONFIG" "$SITE" "$DEVICE_ID" "$STATE" "$ETC" "$PREFIX" <<'PY'
import sys
from pathlib import Path

import yaml

example, out, site, device, state, etc, prefix = sys.argv[1:]
try:
    data = yaml.safe_load(Path(example).read_text()) or {}
except FileNotFoundError:
    data = {}

def put(path, value):
    node = data
    *parents, last = path.split(".")
    for key in parents:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[last] = value

put("device.site", site)
put("device.device_id", device)
put("ingest.watch", f"{state}/inbox")
put("ingest.spool", f"{state}/spool")
put("privacy.salt_file", f"{state}/patient-key.salt")
put("journal.path", f"{state}/journal.sqlite3")
put("mqtt.host", "127.0.0.1")
put("mqtt.port", 8883)
put("mqtt.username", device)
put("mqtt.password_file", f"{etc}/secrets/mqtt-cart.password")
put("mqtt.tls", {"ca_file": f"{etc}/ca.crt"})
put("display.broker_ws_url", "ws://127.0.0.1:9001")
# The cart's own screen logs in as display-kiosk (created above): its site only, acks as itself.
put("display.site", site)
put("display.username", "display-kiosk")
put("display.password_file", f"{etc}/secrets/mqtt-display-kiosk.password")
# Engines are built on the cart into its state folder: the install prefix is read-only to the services.
put("inference.backend.tensorrt.engine_cache", f"{state}/engines")
model = Path(prefix) / "engines" / "cxr-lite0"
if model.is_dir():
    put("inference.model", str(model))
header = (
    "# CXR appliance configuration, written once by tools/install.sh from config/example.yaml\n"
    "# (see that file for every option with comments). Check: cxr-appliance validate-config FILE\n"
)
Path(out).write_text(header + yaml.safe_dump(data, sort_keys=False))
PY
  chmod 0640 "$CONFIG"
  own root:cxr "$CONFIG"
  say "wrote $CONFIG"
fi

# --- 6. systemd units and the udev rule ------------------------------------------------------
install -d -m 0755 "$UNITS" "$UDEV"
for unit in cxr-appliance.service cxr-engine-build.service cxr-usb-import@.service; do
  sed -e "s#/opt/cxr-appliance#$PREFIX#g" -e "s#/etc/cxr-appliance/#$ETC/#g" "$REPO/systemd/$unit" >"$UNITS/$unit.new"
  chmod 0644 "$UNITS/$unit.new"
  mv "$UNITS/$unit.new" "$UNITS/$unit"
done
install -m 0644 "$REPO/systemd/99-cxr-usb.rules" "$UDEV/99-cxr-usb.rules"

if [[ $NO_SYSTEMCTL -eq 0 ]]; then
  udevadm control --reload || true
  systemctl daemon-reload
  systemctl enable mosquitto.service cxr-engine-build.service cxr-appliance.service
  systemctl restart mosquitto.service
  # --no-block: the engine build and the model warm-up may take minutes.
  systemctl restart --no-block cxr-engine-build.service cxr-appliance.service
  say "services enabled and (re)started; follow with: journalctl -fu cxr-appliance"
fi

# --- 7. does it work? -------------------------------------------------------------------------
if [[ $SKIP_DOCTOR -eq 0 ]]; then
  DOCTOR=("$APP_PY" -m appliance.cli doctor --config "$CONFIG")
  [[ -x "$PREFIX/.venv/bin/cxr-appliance" && $SKIP_VENV -eq 0 ]] \
    && DOCTOR=("$PREFIX/.venv/bin/cxr-appliance" doctor --config "$CONFIG")
  if [[ $STAGED -eq 0 ]] && command -v runuser >/dev/null; then
    runuser -u cxr -- "${DOCTOR[@]}" || die "doctor found problems (see above)"
  else
    "${DOCTOR[@]}" || die "doctor found problems (see above)"
  fi
fi
say "done"
