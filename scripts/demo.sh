#!/usr/bin/env bash
# The main job: the node adapting live on a synthetic night drive (see README "The demo").
set -euo pipefail
cd "$(dirname "$0")/.."
py="${VENV:-$PWD/.venv}/bin/python"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
"$py" -m mmtta_ros.tools.demo "$@"
