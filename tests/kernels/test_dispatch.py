import subprocess
import sys
import textwrap

import pytest
import torch

from fusedrl.kernels import _dispatch


def test_kernels_import_without_triton():
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("triton blocked for this test")
                return None
        sys.meta_path.insert(0, Block())
        import torch
        import fusedrl.kernels as K
        assert not K.HAS_TRITON
        h = torch.randn(5, 8); w = torch.randn(11, 8); y = torch.randint(0, 11, (5,))
        print(K.linear_logprobs(h, w, y).shape)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([5])" in out.stdout


def test_force_backend_restores_and_validates():
    assert _dispatch.get_backend() == "auto"
    with _dispatch.force_backend("reference"):
        assert _dispatch.get_backend() == "reference"
        assert not _dispatch.use_triton(torch.zeros(1))
    assert _dispatch.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend"):
        _dispatch.set_backend("cuda-magic")


def test_auto_uses_reference_on_cpu_tensors():
    assert not _dispatch.use_triton(torch.zeros(3), None)
