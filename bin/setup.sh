# Sourced by bin/run, bin/test and .ci/run: installs what is missing on a
# Debian machine (as root through apt-get; otherwise it prints the command).

apt_updated=""

# need COMMAND PACKAGE: make sure COMMAND exists, installing PACKAGE if not.
need() {
    local cmd=$1 pkg=$2
    command -v "$cmd" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        if [ -z "$apt_updated" ]; then
            echo "+ apt-get update" >&2
            apt-get update -qq >&2
            apt_updated=1
        fi
        echo "+ apt-get install -y $pkg" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >&2
    else
        echo "forkd: '$cmd' is missing; install it with: sudo apt-get install -y $pkg" >&2
        exit 1
    fi
}

need_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "forkd: cargo is missing; install Rust (https://rustup.rs) or: sudo apt-get install -y cargo" >&2
        exit 1
    fi
    need cc gcc
}

# need_python_module MODULE PIP_PACKAGE DEBIAN_PACKAGE
need_python_module() {
    local module=$1 pip_pkg=$2 deb_pkg=$3
    need python3 python3
    python3 -c "import $module" >/dev/null 2>&1 && return 0
    # pip first (a pyenv or venv Python); Debian's own Python refuses pip
    # installs (PEP 668), so fall back to its package.
    if python3 -m pip --version >/dev/null 2>&1; then
        echo "+ python3 -m pip install $pip_pkg" >&2
        python3 -m pip install --quiet --disable-pip-version-check "$pip_pkg" >&2 2>/dev/null || true
    fi
    if ! python3 -c "import $module" >/dev/null 2>&1; then
        need_apt_package "$deb_pkg"
    fi
    python3 -c "import $module" >/dev/null 2>&1 || {
        echo "forkd: python3 module '$module' is missing; install it with: python3 -m pip install $pip_pkg (or apt-get install $deb_pkg)" >&2
        exit 1
    }
}

need_apt_package() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        [ -n "$apt_updated" ] || { apt-get update -qq >&2; apt_updated=1; }
        echo "+ apt-get install -y $1" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >&2
    else
        echo "forkd: install it with: sudo apt-get install -y $1" >&2
        exit 1
    fi
}
