#!/bin/sh
# Install hive as a systemd service from this checkout. Run as root; see docs/deploy.md.
#
#   sudo ./systemd/install.sh              install or upgrade
#   ./systemd/install.sh --dry-run         print what it would do, change nothing (no root needed)
#
# It installs hive into a virtual environment ($PREFIX, default /opt/hive) from the checkout this
# script lives in; the unit to /etc/systemd/system/hive.service, ExecStart= pointing at
# $PREFIX/bin/hive; the hive user (sysusers.d); /etc/hive/hive.toml and an API token
# /etc/hive/token, each only if there is none; and a `hive` command for operators in $BINDIR (the
# CLI with HIVE_CONFIG=/etc/hive/hive.toml, so `sudo hive status` finds the service's socket).
# Then it runs `systemctl daemon-reload`. It never starts, stops or restarts hive: after an
# upgrade, restart it as docs/deploy.md explains.
#
# Environment:
#   PREFIX=/opt/hive            the venv hive is installed into
#   PYTHON=python3              the interpreter that creates the venv (3.11 or newer)
#   DESTDIR=                    stage every file under this root instead of /; the steps that
#                               act on the running system (users, ownership, systemctl) are then
#                               skipped, so it needs no root. The staged venv names only PREFIX
#                               (systemd/relocate.py): copied to PREFIX, it runs from there
#   UNITDIR=/etc/systemd/system
#   BINDIR=/usr/local/bin       where the operators' `hive` wrapper goes (an existing `hive` there
#                               that is not this wrapper is left alone)
#   SYSUSERSDIR=/etc/sysusers.d
#   PIP_ARGS=                   extra arguments for pip install (e.g. --no-index --find-links=DIR)
# Options:
#   --dry-run     print the plan, do nothing
#   --skip-venv   do not create the venv or install hive into it (only the system files)

set -eu

PREFIX=${PREFIX:-/opt/hive}
PYTHON=${PYTHON:-python3}
DESTDIR=${DESTDIR:-}
UNITDIR=${UNITDIR:-/etc/systemd/system}
BINDIR=${BINDIR:-/usr/local/bin}
SYSUSERSDIR=${SYSUSERSDIR:-/etc/sysusers.d}
CONFDIR=/etc/hive # fixed: the unit's ConfigurationDirectory=hive and --config name it
PIP_ARGS=${PIP_ARGS:-}

DRY_RUN=0
SKIP_VENV=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        --skip-venv) SKIP_VENV=1 ;;
        -h | --help)
            sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
            exit 0
            ;;
        *)
            echo "install.sh: unknown argument: $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

# DESTDIR as an absolute path without a trailing slash: the staged venv is relocated by it.
case $DESTDIR in
    "" | /) ;;
    /*) DESTDIR=${DESTDIR%/} ;;
    *) DESTDIR=$(pwd)/${DESTDIR%/} ;;
esac
case $PREFIX in
    /*) ;;
    *)
        echo "install.sh: PREFIX must be an absolute path, not $PREFIX" >&2
        exit 2
        ;;
esac

HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(dirname "$HERE")

say() { printf '%s\n' "$*"; }

# Run a command, or only print it with --dry-run.
run() {
    say "+ $*"
    if [ "$DRY_RUN" = 0 ]; then
        "$@"
    fi
}

# A step on the live system: skipped when staging into DESTDIR.
live() {
    if [ -n "$DESTDIR" ]; then
        say "skip (DESTDIR): $*"
    else
        run "$@"
    fi
}

for file in hive.service hive.sysusers hive.toml.example relocate.py; do
    if [ ! -f "$HERE/$file" ]; then
        echo "install.sh: $HERE/$file is missing" >&2
        exit 1
    fi
done
if [ ! -f "$SRC/pyproject.toml" ]; then
    echo "install.sh: no pyproject.toml in $SRC: run the script from a hive checkout" >&2
    exit 1
fi
if [ "$DRY_RUN" = 0 ] && [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (or try --dry-run, or DESTDIR=... to stage)" >&2
    exit 1
fi

say "hive installer: source $SRC, prefix $PREFIX${DESTDIR:+, staged under $DESTDIR}"
if [ "$DRY_RUN" = 1 ]; then
    say "dry run: nothing is changed"
fi

# 1. hive in its own venv.
if [ "$SKIP_VENV" = 1 ]; then
    say "skip (--skip-venv): venv $DESTDIR$PREFIX"
else
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "install.sh: hive needs Python 3.11 or newer; $PYTHON is not (set PYTHON=python3.12)" >&2
        exit 1
    fi
    if [ ! -x "$DESTDIR$PREFIX/bin/python" ]; then
        run "$PYTHON" -m venv "$DESTDIR$PREFIX"
    fi
    # pip builds hive inside the directory it is given, and setuptools puts whatever that
    # directory's build/ holds into the wheel: a module removed from the checkout since the last
    # install would be installed again, and root would leave build/ and hive.egg-info in the
    # checkout. pip gets a fresh copy of what the package is made of instead.
    if [ "$DRY_RUN" = 1 ]; then
        BUILD="${TMPDIR:-/tmp}/hive-src.XXXXXX"
    else
        BUILD=$(mktemp -d "${TMPDIR:-/tmp}/hive-src.XXXXXX")
        trap 'rm -rf "$BUILD"' EXIT
        trap 'exit 130' INT
        trap 'exit 143' TERM
    fi
    run cp -R "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/LICENSE" "$SRC/hive" "$BUILD/"
    if [ -z "$DESTDIR" ] || [ "$DESTDIR" = / ]; then
        # shellcheck disable=SC2086  # PIP_ARGS is a list of words
        run "$DESTDIR$PREFIX/bin/python" -m pip install --quiet --upgrade $PIP_ARGS "$BUILD"
    else
        # Staged: the venv names DESTDIR in its shebangs, pyvenv.cfg, activate scripts and
        # compiled modules; relocate.py makes them name PREFIX, where the tree will run, and
        # compiles the modules itself (hence --no-compile).
        # shellcheck disable=SC2086  # PIP_ARGS is a list of words
        run "$DESTDIR$PREFIX/bin/python" -m pip install --quiet --upgrade --no-compile $PIP_ARGS \
            "$BUILD"
        run "$DESTDIR$PREFIX/bin/python" "$HERE/relocate.py" "$DESTDIR" "$PREFIX"
    fi
fi

# 2. The hive user: before anything is owned by its group.
run install -d -m 0755 "$DESTDIR$SYSUSERSDIR"
run install -m 0644 "$HERE/hive.sysusers" "$DESTDIR$SYSUSERSDIR/hive.conf"
if command -v systemd-sysusers >/dev/null 2>&1 || [ "$DRY_RUN" = 1 ]; then
    live systemd-sysusers "$SYSUSERSDIR/hive.conf"
else
    # No systemd-sysusers (very old systemd): the same with shadow-utils.
    if ! id hive >/dev/null 2>&1; then
        live useradd --system --user-group --home-dir /var/lib/hive --no-create-home \
            --shell /usr/sbin/nologin --comment "hive node agent" hive
    fi
    live usermod -a -G video hive
fi

# 3. The unit, with ExecStart= pointing at this install.
run install -d -m 0755 "$DESTDIR$UNITDIR"
say "+ sed 's|^ExecStart=/usr/local/bin/hive |ExecStart=$PREFIX/bin/hive |' $HERE/hive.service > $DESTDIR$UNITDIR/hive.service"
if [ "$DRY_RUN" = 0 ]; then
    sed "s|^ExecStart=/usr/local/bin/hive |ExecStart=$PREFIX/bin/hive |" "$HERE/hive.service" \
        >"$DESTDIR$UNITDIR/hive.service.tmp"
    chmod 0644 "$DESTDIR$UNITDIR/hive.service.tmp"
    mv "$DESTDIR$UNITDIR/hive.service.tmp" "$DESTDIR$UNITDIR/hive.service"
fi

# 4. Configuration and token, never overwritten: readable by root and the hive group only.
run install -d -m 0755 "$DESTDIR$CONFDIR"
if [ -e "$DESTDIR$CONFDIR/hive.toml" ]; then
    say "keep $DESTDIR$CONFDIR/hive.toml (exists; compare with $HERE/hive.toml.example)"
else
    run install -m 0640 "$HERE/hive.toml.example" "$DESTDIR$CONFDIR/hive.toml"
    live chgrp hive "$CONFDIR/hive.toml"
fi
if [ -e "$DESTDIR$CONFDIR/token" ]; then
    say "keep $DESTDIR$CONFDIR/token (exists)"
else
    say "+ new random token > $DESTDIR$CONFDIR/token (mode 0640)"
    if [ "$DRY_RUN" = 0 ]; then
        (
            umask 077
            od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$DESTDIR$CONFDIR/token.tmp"
            echo >>"$DESTDIR$CONFDIR/token.tmp"
        )
        chmod 0640 "$DESTDIR$CONFDIR/token.tmp"
        mv "$DESTDIR$CONFDIR/token.tmp" "$DESTDIR$CONFDIR/token"
    fi
    live chgrp hive "$CONFDIR/token"
fi

# 5. The operators' `hive`: the CLI, reading the service's configuration by default.
MARK="installed by hive's systemd/install.sh"
WRAPPER="$DESTDIR$BINDIR/hive"
if [ -e "$WRAPPER" ] && ! grep -q "$MARK" "$WRAPPER" 2>/dev/null; then
    say "keep $WRAPPER (not ours; use HIVE_CONFIG=$CONFDIR/hive.toml $PREFIX/bin/hive)"
else
    run install -d -m 0755 "$DESTDIR$BINDIR"
    say "+ write $WRAPPER (exec $PREFIX/bin/hive with HIVE_CONFIG=$CONFDIR/hive.toml)"
    if [ "$DRY_RUN" = 0 ]; then
        cat >"$WRAPPER.tmp" <<EOF
#!/bin/sh
# hive's CLI for operators, $MARK.
: "\${HIVE_CONFIG:=$CONFDIR/hive.toml}"
export HIVE_CONFIG
exec "$PREFIX/bin/hive" "\$@"
EOF
        chmod 0755 "$WRAPPER.tmp"
        mv "$WRAPPER.tmp" "$WRAPPER"
    fi
fi

# 6. Tell systemd.
live systemctl daemon-reload

say "done. Next: edit $CONFDIR/hive.toml, then: systemctl enable --now hive (docs/deploy.md)"
