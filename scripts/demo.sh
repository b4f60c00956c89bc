#!/usr/bin/env bash
# The main job. It grows with the project; see README "The demo".
set -euo pipefail
cd "$(dirname "$0")/.."
py="${VENV:-$PWD/.venv}/bin/python"
"$py" -m mmtta_ros.tools.sensor_core_benchmark
