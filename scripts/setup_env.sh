#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the pinned
# dependencies from requirements.txt. Safe to run again: it only reinstalls when
# requirements.txt, this script, or the package's setup.py changed since the last run.
#
#   VENV=path   use another location for the environment (default: <repo>/.venv)
#   PYTHON=exe  the interpreter that creates it (default: python3.11, else python3)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"

log() { printf '[setup] %s\n' "$*" >&2; }

# --- system libraries that Python wheels need (open3d and its offscreen renderer) -------
system_packages=(libusb-1.0-0 libgomp1 libvulkan1 mesa-vulkan-drivers)
if command -v dpkg-query >/dev/null 2>&1; then
  missing=()
  for pkg in "${system_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    if [ "$(id -u)" -eq 0 ]; then
      log "installing system packages: ${missing[*]}"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >/dev/null
      apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
      log "WARNING: missing system packages: ${missing[*]}"
      log "  open3d (3D rendering) will not import without them; install them with:"
      log "  sudo apt-get install ${missing[*]}"
    fi
  fi
else
  log "not a Debian system: make sure ${system_packages[*]} (or equivalents) are installed"
fi

# --- which tags of requirements.txt apply here ------------------------------------------
tags=(all)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  tags+=(cuda)
else
  tags+=(cpu)
fi
site_flag=()
if [ -n "${ROS_DISTRO:-}" ]; then
  # A sourced ROS 2 install provides rclpy and the messages; let the venv see them.
  log "ROS 2 '$ROS_DISTRO' is sourced: using its rclpy and messages"
  site_flag=(--system-site-packages)
else
  tags+=(ros-wheels)
fi
tag_regex="\\[($(IFS='|'; echo "${tags[*]}"))\\]"

stamp_input="$(cat "$repo/requirements.txt" "$repo/scripts/setup_env.sh" "$repo/setup.py"; \
  echo "${tags[*]}" "${ROS_DISTRO:-}")"
stamp="$(printf '%s' "$stamp_input" | sha256sum | cut -c1-16)"
stamp_file="$venv/.mmtta_ros-setup-$stamp"

if [ -f "$stamp_file" ]; then
  log "environment up to date: $venv"
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  log "creating virtual environment $venv with $python"
  "$python" -m venv "${site_flag[@]}" "$venv"
fi

requirements="$(grep -E "$tag_regex" "$repo/requirements.txt" | sed -E 's/[[:space:]]*#.*$//')"
log "installing pinned dependencies (tags: ${tags[*]})"
# pip warns about every local index directory that lacks a package: keep only real news.
pip_install() {
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
# shellcheck disable=SC2086
pip_install $requirements
nodeps="$(grep -E '\[no-deps\]' "$repo/requirements.txt" | sed -E 's/[[:space:]]*#.*$//')"
# shellcheck disable=SC2086
[ -z "$nodeps" ] || pip_install --no-deps $nodeps
# The package itself, editable, so the console scripts point at this checkout.
pip_install --no-deps --no-build-isolation -e "$repo"

rm -f "$venv"/.mmtta_ros-setup-*
touch "$stamp_file"
log "environment ready: $venv"
