"""The built extension's exports (csrc/torch_ops.cpp, PYBIND11_MODULE) equal tokenweave/_abi.py's Python
definitions, which tests/cpu/test_abi.py checks against the C++ headers. Needs the extension only (no kernel runs)."""
import pytest

from tokenweave import _abi
from tokenweave._ext import _C


@pytest.mark.gpu
@pytest.mark.skipif(_C is None, reason="the CUDA extension is not built")
@pytest.mark.parametrize("name", sorted(_abi._PYTHON))
def test_python_definition_equals_the_export(name):
    exported = getattr(_C, name, None)
    assert exported is not None, f"the extension does not export {name}: rebuild it (pip install -e .)"
    value = dict(exported) if isinstance(_abi._PYTHON[name], dict) else int(exported)
    assert value == _abi._PYTHON[name]
    assert getattr(_abi, name) == _abi._PYTHON[name]
    assert _abi.SOURCE == "extension"
