"""Everything under tests/perf is marked ``perf``: benchmarks and the perf gate's own tests.

The default run (``python -m pytest``, or any run that names no path inside tests/perf and
gives no ``-m``) deselects them. They run when selected on purpose:

* ``python -m pytest -m perf tests/perf`` (CI's perf step), or any ``-m`` expression
  (``-m gpu`` picks the GPU benchmarks; ``-m "not perf"`` keeps them out);
* a path inside tests/perf on the command line (``pytest tests/perf --benchmark-enable``,
  ``python -m profiling.perf_gate --benchmarks compare``, which passes no ``-m``).

Not done with ``addopts = -m 'not perf'``: that would also deselect them in the perf gate's
``--benchmarks`` runs, which name tests/perf but no marker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _inside_here(arg: str) -> bool:
    path = Path(arg.split("::", 1)[0]).resolve()
    return path == HERE or HERE in path.parents


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config, items):
    mine = [item for item in items if HERE in Path(str(item.path)).resolve().parents]
    for item in mine:
        item.add_marker(pytest.mark.perf)
    chosen = config.option.markexpr or (
        config.args_source != pytest.Config.ArgsSource.TESTPATHS and any(_inside_here(a) for a in config.args))
    if mine and not chosen:
        skip = set(map(id, mine))
        config.hook.pytest_deselected(items=mine)
        items[:] = [item for item in items if id(item) not in skip]
