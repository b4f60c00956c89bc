"""
`colcon build` of mmtta_ros (ament_python) gives the install tree a ROS 2 user expects.

Builds the checkout into a scratch workspace under pytest's tmp_path, once as a normal
(copying) install and once with --symlink-install, with the interpreter running the
tests, then checks the install tree and that a sourced workspace finds the package.
"""

import ast
from dataclasses import dataclass
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = 'mmtta_ros'
PYTHON_LIB = 'lib/python%d.%d/site-packages' % sys.version_info[:2]
BUILD_TIMEOUT_S = 300

pytestmark = pytest.mark.slow


@dataclass
class ColconBuild:
    """One finished colcon build and what the source tree held when it started."""

    mode: str  # 'copy' or 'symlink'
    build_base: Path
    install_base: Path  # the workspace's install/ (holds local_setup.sh)
    prefix: Path  # install/mmtta_ros: the package's own prefix (isolated layout)
    source_py_files: list  # package .py files relative to ROOT, e.g. 'mmtta_ros/frame.py'
    launch_files: list  # file names in launch/
    config_files: list  # file names in config/
    output: str = ''  # colcon's stdout and stderr


def console_scripts():
    """Console scripts declared in setup.py, {name: 'module:function'}, read with ast."""
    tree = ast.parse((ROOT / 'setup.py').read_text(), filename='setup.py')
    for node in ast.walk(tree):
        if not isinstance(node, ast.keyword) or node.arg != 'entry_points':
            continue
        entry_points = ast.literal_eval(node.value)
        scripts = {}
        for spec in entry_points.get('console_scripts', []):
            name, _, target = spec.partition('=')
            scripts[name.strip()] = target.strip()
        return scripts
    return {}


def _files_in(directory):
    """Sorted names of the plain files in a directory of the checkout (none if it is missing)."""
    path = ROOT / directory
    if not path.is_dir():
        return []
    return sorted(entry.name for entry in path.iterdir() if entry.is_file())


def _require_colcon():
    """Skip unless colcon with its ROS extension can run in this interpreter."""
    for module, dist in (('colcon_core', 'colcon-core'), ('colcon_ros', 'colcon-ros')):
        if importlib.util.find_spec(module) is None:
            pytest.skip('%s is not installed for %s (pip install -r requirements.txt)'
                        % (dist, sys.executable))


def _colcon_build(workspace, mode):
    """Run `colcon build` on the checkout into workspace; return the finished ColconBuild."""
    source_py_files = sorted(str(path.relative_to(ROOT))
                             for path in (ROOT / PACKAGE).rglob('*.py')
                             if '__pycache__' not in path.parts)
    build = ColconBuild(
        mode=mode, build_base=workspace / 'build', install_base=workspace / 'install',
        prefix=workspace / 'install' / PACKAGE, source_py_files=source_py_files,
        launch_files=_files_in('launch'), config_files=_files_in('config'))
    log_base = workspace / 'log'
    env = dict(os.environ)
    # Keep colcon's logs, user defaults (~/.colcon) and byte code out of the checkout and home.
    env.update(COLCON_LOG_PATH=str(log_base), COLCON_HOME=str(workspace / 'colcon_home'),
               PYTHONDONTWRITEBYTECODE='1')
    command = [sys.executable, '-m', 'colcon', '--log-base', str(log_base), 'build',
               '--base-paths', str(ROOT), '--build-base', str(build.build_base),
               '--install-base', str(build.install_base),
               '--event-handlers', 'console_direct+', '--executor', 'sequential']
    if mode == 'symlink':
        command.append('--symlink-install')
    result = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True,
                            timeout=BUILD_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, 'colcon build (%s) failed:\n%s' % (mode, output[-6000:])
    assert 'Finished <<< %s' % PACKAGE in output, 'colcon built no %s:\n%s' % (PACKAGE, output)
    build.output = output
    return build


def _run_in_sourced_workspace(build, code):
    """Run python code after sourcing the workspace's local_setup.sh; return its JSON print."""
    env = {key: value for key, value in os.environ.items()
           if key not in ('COLCON_CURRENT_PREFIX', 'PYTHONPATH')}
    env['PYTHONDONTWRITEBYTECODE'] = '1'
    # cwd is the workspace so the checkout on sys.path[0] cannot shadow the installed package.
    result = subprocess.run(
        ['sh', '-c', '. "$1/local_setup.sh" && exec "$2" -c "$3"', 'sh',
         str(build.install_base), sys.executable, code],
        cwd=build.install_base.parent, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, 'in the sourced workspace:\n%s%s' % (result.stdout,
                                                                        result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module', params=['copy', 'symlink'])
def colcon_build(request, tmp_path_factory):
    """Build the package with colcon into a scratch workspace, removed afterwards."""
    _require_colcon()
    workspace = tmp_path_factory.mktemp('colcon_ws_%s' % request.param).resolve()
    try:
        yield _colcon_build(workspace, request.param)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


def test_setup_py_declares_console_scripts():
    """setup.py lists at least one console script, so `ros2 run mmtta_ros ...` has a target."""
    scripts = console_scripts()
    assert scripts, 'setup.py declares no console_scripts'
    for name, target in scripts.items():
        module, _, function = target.partition(':')
        assert name and module and function, 'malformed console script %r = %r' % (name, target)


def test_console_scripts_in_lib_package_dir(colcon_build):
    """Every console script is an executable in lib/mmtta_ros run by this interpreter."""
    script_dir = colcon_build.prefix / 'lib' / PACKAGE
    assert script_dir.is_dir() and any(script_dir.iterdir()), '%s is empty' % script_dir
    for name in console_scripts():
        script = script_dir / name
        assert script.is_file(), 'console script %s not installed in %s' % (name, script_dir)
        assert os.access(script, os.X_OK), '%s is not executable' % script
        shebang = script.read_text().splitlines()[0]
        assert shebang.startswith('#!'), '%s has no shebang' % script
        # Same virtualenv as the tests: `ros2 run` must find torch, spconv and rclpy.
        interpreter = Path(shebang[2:].split()[0])
        assert interpreter.parent == Path(sys.executable).parent, (shebang, sys.executable)


def test_share_dir_holds_package_xml_launch_and_config(colcon_build):
    """share/mmtta_ros holds package.xml and every file of launch/ and config/."""
    share = colcon_build.prefix / 'share' / PACKAGE
    package_xml = share / 'package.xml'
    assert package_xml.is_file(), 'package.xml not installed in %s' % share
    assert package_xml.read_bytes() == (ROOT / 'package.xml').read_bytes()
    for directory, names in (('launch', colcon_build.launch_files),
                             ('config', colcon_build.config_files)):
        installed = share / directory
        assert installed.is_dir(), '%s not installed' % installed
        missing = [name for name in names if not (installed / name).is_file()]
        assert not missing, '%s/ files not installed in %s: %s' % (directory, installed, missing)


def test_ament_index_registers_package(colcon_build):
    """The ament index marks the package and colcon built it as ament_python."""
    marker = (colcon_build.prefix / 'share' / 'ament_index' / 'resource_index' / 'packages'
              / PACKAGE)
    assert marker.is_file(), 'ament index marker %s missing' % marker
    # colcon-ros writes this hook only for build type ament_python (not plain python).
    hook = colcon_build.prefix / 'share' / PACKAGE / 'hook' / 'ament_prefix_path.dsv'
    assert hook.is_file(), '%s missing: not built as ament_python' % hook


def test_setup_py_installs_index_marker_and_manifest(colcon_build):
    """setup.py installs the ament index marker and package.xml itself, not colcon-ros."""
    # colcon-ros stands in for a setup.py that does not, and warns so; pip installs would not.
    assert "doesn't explicitly install" not in colcon_build.output, colcon_build.output


def test_python_package_installed(colcon_build):
    """The python package is installed: a copy of every source .py, or a link to the source."""
    site_packages = colcon_build.prefix / PYTHON_LIB
    assert site_packages.is_dir(), '%s missing' % site_packages
    if colcon_build.mode == 'symlink':
        # `setup.py develop`: the build dir links the source package and goes on PYTHONPATH;
        # an egg-link in site-packages records it.
        # setuptools 80 dropped `develop --editable`; colcon then falls back to a copy.
        assert list(site_packages.glob('*.egg-link')), (
            'no egg-link in %s: --symlink-install needs setuptools<80, this is setuptools %s'
            % (site_packages, importlib.metadata.version('setuptools')))
        linked = colcon_build.build_base / PACKAGE / PACKAGE
        assert linked.resolve() == (ROOT / PACKAGE).resolve(), '%s does not link the source' % (
            linked)
        return
    missing = [name for name in colcon_build.source_py_files
               if not (site_packages / name).is_file()]
    # A sub-directory without __init__.py is no package to find_packages(): not installed.
    assert not missing, 'not installed (missing __init__.py?): %s' % missing


def test_sourced_workspace_imports_installed_package(colcon_build):
    """After sourcing local_setup.sh, mmtta_ros and the console script targets resolve there."""
    modules = sorted({target.partition(':')[0] for target in console_scripts().values()})
    code = (
        'import importlib.util, json, mmtta_ros\n'
        'modules = %r\n'
        'origins = {m: getattr(importlib.util.find_spec(m), "origin", None) for m in modules}\n'
        'print(json.dumps({"package": mmtta_ros.__file__, "origins": origins}))\n' % modules)
    found = _run_in_sourced_workspace(colcon_build, code)
    root = colcon_build.prefix if colcon_build.mode == 'copy' else colcon_build.build_base
    package_file = Path(found['package'])
    assert root in package_file.parents, 'imported %s, not from %s' % (package_file, root)
    for target in console_scripts().values():
        module, _, function = target.partition(':')
        origin = found['origins'][module]
        assert origin is not None, 'console script target module %s not installed' % module
        assert root in Path(origin).parents, 'imported %s, not from %s' % (origin, root)
        tree = ast.parse(Path(origin).read_text(), filename=origin)
        defined = {node.name for node in tree.body
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
        assert function in defined, '%s defines no top-level %s()' % (origin, function)


def test_sourced_workspace_ament_index_lookup(colcon_build):
    """ament_index_python finds share/mmtta_ros of this install, as launch files do."""
    pytest.importorskip('ament_index_python', reason='ament_index_python not installed')
    code = ('import json\n'
            'from ament_index_python.packages import get_package_share_directory\n'
            'print(json.dumps(get_package_share_directory(%r)))\n' % PACKAGE)
    share = _run_in_sourced_workspace(colcon_build, code)
    assert Path(share) == colcon_build.prefix / 'share' / PACKAGE
