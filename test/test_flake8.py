"""flake8 over the package, the ROS way (ament_flake8)."""

from pathlib import Path

import pytest

# What we lint: the package, its tests, launch files and setup.py (never .venv or build/).
ROOT = Path(__file__).resolve().parents[1]
LINTED = [str(ROOT / name) for name in ('mmtta_ros', 'test', 'launch', 'setup.py')
          if (ROOT / name).exists()]


@pytest.mark.flake8
@pytest.mark.linter
def test_flake8():
    ament_flake8 = pytest.importorskip('ament_flake8.main', reason='ament_flake8 not installed')
    rc, errors = ament_flake8.main_with_errors(argv=LINTED)
    assert rc == 0, 'Found %d code style errors / warnings:\n' % len(errors) + '\n'.join(errors)
