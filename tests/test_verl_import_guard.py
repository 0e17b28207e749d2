"""``import prepo.integrations.verl`` where verl or one of its v1 trainer's dependencies is missing
says to install the ``[verl]`` extra (the integration's own tests run in verl's environment:
tests_verl/, .ci/run_verl)."""
import importlib
import importlib.util
import sys

import pytest

MODULE = "prepo.integrations.verl"
DEPENDENCIES = ("verl", "transfer_queue", "omegaconf", "tensordict")  # in the order the module imports them


@pytest.mark.parametrize("missing", DEPENDENCIES)
def test_missing_dependency_names_the_extra(monkeypatch, missing):
    # the first one absent, counting the one this case hides (here verl itself may not be installed)
    first = next(m for m in DEPENDENCIES if m == missing or importlib.util.find_spec(m) is None)
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` raises ImportError, as when not installed
    with pytest.raises(ImportError, match=rf"\({first} is missing\): pip install 'prepo\[verl\]'"):
        importlib.import_module(MODULE)
    assert MODULE not in sys.modules
