"""
The shipped Fast DDS profile for large clouds, and the environment that turns it on.

config/fastdds_large_data.xml gives every participant of a process a shared-memory
transport whose segment holds several ~700 KB clouds, and UDP sockets with 4 MB buffers
(README "Large clouds over DDS" has the measured effect). Fast DDS reads it from
FASTDDS_DEFAULT_PROFILES_FILE when the process creates its first participant, so it is
set in the environment of the processes a launch file or the demo starts, never here
for a running process. This module does not import rclpy or launch.
"""

import os
from pathlib import Path
from typing import Dict, Mapping, Optional

PROFILE_FILE = 'fastdds_large_data.xml'
# Fast DDS 3 reads this variable (FASTRTPS_DEFAULT_PROFILES_FILE was Fast DDS 2's name).
PROFILES_VARIABLE = 'FASTDDS_DEFAULT_PROFILES_FILE'
# Set to 0/false/off to leave Fast DDS's defaults (launch argument dds_profile:=false).
SWITCH_VARIABLE = 'MMTTA_DDS_PROFILE'


def profile_path() -> Path:
    """Return config/fastdds_large_data.xml: the installed share's, else the checkout's."""
    try:
        from ament_index_python.packages import get_package_share_directory
        path = Path(get_package_share_directory('mmtta_ros')) / 'config' / PROFILE_FILE
        if path.is_file():
            return path
    except (ImportError, LookupError, OSError, ValueError):
        pass
    return Path(__file__).resolve().parents[2] / 'config' / PROFILE_FILE


def is_enabled(value: Optional[str]) -> bool:
    """Return whether a switch value (env var or launch argument) asks for the profile."""
    if value is None or value.strip() == '':
        return True
    text = value.strip().lower()
    if text in ('1', 'true', 'yes', 'on'):
        return True
    if text in ('0', 'false', 'no', 'off'):
        return False
    raise ValueError(f'{SWITCH_VARIABLE} / dds_profile must be true or false, got {value!r}')


def dds_environment(env: Optional[Mapping[str, str]] = None,
                    enabled: Optional[bool] = None) -> Dict[str, str]:
    """
    Return a copy of `env` (default: os.environ) that loads the shipped profile.

    enabled: None reads MMTTA_DDS_PROFILE from `env` (on unless 0/false/off). A profile
    file the user already named in FASTDDS_DEFAULT_PROFILES_FILE is kept: theirs wins.
    Disabled, the variable is left as the user set it (or unset).
    """
    result = dict(os.environ if env is None else env)
    if enabled is None:
        enabled = is_enabled(result.get(SWITCH_VARIABLE))
    if enabled and not result.get(PROFILES_VARIABLE):
        path = profile_path()
        if not path.is_file():
            raise FileNotFoundError(f'the Fast DDS profile {path} is missing: reinstall '
                                    f'mmtta_ros or set {SWITCH_VARIABLE}=0')
        result[PROFILES_VARIABLE] = str(path)
    return result
