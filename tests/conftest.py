import os

# aqlm's numba CPU kernel races across threads and gives wrong numbers; pin it to one thread
# before numba is imported anywhere (tests that run aqlm's own layer rely on this). numba reads it
# once, at import, and pytest imports this file before any test module: this is the one place the
# tests set it.
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import importlib.util  # noqa: E402
from typing import Optional  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Third-party packages that only some test modules need (the PEFT layer, aqlm's own layer as an
# oracle, the quantizer, the CLI, the fuzz tests). The ops and their tests need none of them.
OPTIONAL_PACKAGES = ("aqlm", "peft", "transformers", "accelerate", "safetensors", "numba", "scipy", "hypothesis")


def _not_installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is None
    except (ImportError, ValueError):  # blocked (sys.modules[name] = None) or a broken install
        return True


def missing_optional_package(err: BaseException) -> Optional[str]:
    """The optional package whose absence caused ``err`` (an import failure), else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ImportError):
            root = (err.name or "").partition(".")[0]
            if root in OPTIONAL_PACKAGES and _not_installed(root):
                return root
        err = err.__cause__ or err.__context__
    return None


class _OptionalDepsModule(pytest.Module):
    """A test module that is reported as skipped, not as a collection error, when importing it
    fails only because an optional package is not installed. Where every package is installed
    this changes nothing; any other import error still fails the run."""

    def collect(self):
        try:
            return list(super().collect())
        except Exception as err:
            missing = missing_optional_package(err)
            if missing is None:
                raise
            reason = f"{self.path.name} needs the '{missing}' package, which is not installed"
            pytest.skip(reason, allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    if module_path.name == "__init__.py":
        return None
    return _OptionalDepsModule.from_parent(parent, path=module_path)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The ``cuda`` marker on every case parametrized with device "cuda" (tests/support/weights.devices
    adds it where a GPU and the CUDA kernels are there): ``-m cuda`` runs the GPU cases only."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and str(callspec.params.get("device", "")).startswith("cuda"):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
