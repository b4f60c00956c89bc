"""pep257 docstring style over the package, the ROS way (ament_pep257)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINTED = [str(ROOT / name) for name in ('mmtta_ros', 'test', 'launch') if (ROOT / name).exists()]


@pytest.mark.linter
@pytest.mark.pep257
def test_pep257():
    ament_pep257 = pytest.importorskip('ament_pep257.main', reason='ament_pep257 not installed')
    rc = ament_pep257.main(argv=LINTED)
    assert rc == 0, 'Found code style errors / warnings'
