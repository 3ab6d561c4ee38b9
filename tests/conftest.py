"""Test set-up shared by the whole suite.

Triton decides at import time whether a ``@triton.jit`` function is compiled or interpreted, so
``TRITON_INTERPRET=1`` must be in the environment before any seqpar kernel module is imported.
``make test`` sets it; this default makes a bare ``pytest`` behave the same on a CPU machine.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.hookimpl(tryfirst=True)  # before xdist's worker tags each grouped test id with its group
def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n N --dist loadgroup`` (``make test``) the tests of a file that defines a
    module-scoped fixture (a training run its tests share, the two-host namespaces, the Slurm daemons)
    go to one worker, so the fixture is built once; every other test is balanced one by one."""
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        defs = getattr(item, "_fixtureinfo", None)
        if defs is None:
            continue
        if any(fd.scope == "module" and fd.baseid == module
               for fds in defs.name2fixturedefs.values() for fd in fds):
            item.add_marker(pytest.mark.xdist_group(module))


def pytest_collection_finish(session):
    """The grouping above only works if pytest-xdist's worker can tag each grouped test id with its
    group (``nodeid@group``); pytest 9 drops that tag (pyproject pins pytest < 9). Fail loudly rather
    than build every module fixture on both workers (twice the time, two Slurm clusters at once)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None or not getattr(session.config.option, "loadgroup", False):
        return  # not an xdist worker of a --dist loadgroup run (xdist's worker sets option.loadgroup)
    for item in session.items:
        # xdist's tag: every xdist_group name of the item, sorted and joined by "_"
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if names and not item.nodeid.endswith("@" + "_".join(names)):
            raise pytest.UsageError(f"--dist loadgroup does not group with pytest {pytest.__version__}: "
                                    f"{item.nodeid} lost its @{'_'.join(names)} tag (pin pytest < 9)")
