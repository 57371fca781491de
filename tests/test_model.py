import pytest
import torch
import torch.nn.functional as F

from checkpoints import checkpoint_name, load_model, parse_checkpoint_name
from model import ANML, OML, SANML, ConvBlock, instance_norm, max_pool

SPEC_SHAPES = {
    **{f"{net}.convBlock{i}.{part}": None for net in ("rln", "nm") for i in (1, 2, 3)
       for part in ("conv.weight", "conv.bias", "norm.weight", "norm.bias")},
    "nm.fc.weight": (2304, 1008), "nm.fc.bias": (2304,), "fc.weight": (1000, 2304), "fc.bias": (1000,),
}


def test_state_dict_keys_and_shapes_are_the_spec():
    state = ANML().state_dict()
    assert set(state) == set(SPEC_SHAPES)
    for key, shape in SPEC_SHAPES.items():
        if shape is not None:
            assert tuple(state[key].shape) == shape
    assert state["rln.convBlock1.conv.weight"].shape == (256, 1, 3, 3)
    assert state["rln.convBlock3.conv.weight"].shape == (256, 256, 3, 3)
    assert state["nm.convBlock2.conv.weight"].shape == (112, 112, 3, 3)
    assert list(ANML().buffers()) == []


def test_shapes_and_gate():
    model = ANML()
    x = torch.rand(3, 1, 28, 28)
    assert model.rln(x).shape == (3, 2304)
    gate = model.nm(x)
    assert gate.shape == (3, 2304) and gate.min() > 0 and gate.max() < 1
    assert model(x).shape == (3, 1000)
    torch.testing.assert_close(model(x), model.fc(model.rln(x) * gate))


def test_instance_norm_makes_each_image_independent_of_its_batch():
    model = ANML(16, 8, 144)
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(model(x)[1:2], model(x[1:2]))


def test_norm_is_the_specs_instance_norm():
    block = ConvBlock(3, 5)
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 2)
        block.norm.bias.uniform_(-1, 1)
    spec = torch.nn.InstanceNorm2d(5, affine=True)
    spec.load_state_dict(block.norm.state_dict())
    x = torch.randn(4, 5, 9, 9, requires_grad=True)
    ours, theirs = instance_norm(x, block.norm.weight, block.norm.bias, block.norm.eps), spec(x)
    torch.testing.assert_close(ours, theirs)
    grad = torch.randn_like(ours)
    torch.testing.assert_close(torch.autograd.grad(ours, [x, *block.norm.parameters()], grad),
                               torch.autograd.grad(theirs, [x, *spec.parameters()], grad))


def test_instance_norm_is_group_norm_to_the_second_derivative():
    """The outer step differentiates the inner steps' gradients: the written-out double backward must be right."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(instance_norm, (x, w, b))

    def second_derivatives(norm, outer):  # the shape of the outer step: a loss of first derivatives, differentiated
        y = norm(x, w, b)
        dx, dw = torch.autograd.grad((y.sin() * y).sum(), (x, w), create_graph=True)
        return torch.autograd.grad(outer(dx, dw), (x, w, b))

    # The second loss leaves dx unused: autograd hands the double backward zeros for it.
    for outer in (lambda dx, dw: dx.cos().sum() + (dw ** 2).sum(), lambda dx, dw: (dw ** 2).sum()):
        torch.testing.assert_close(second_derivatives(instance_norm, outer),
                                   second_derivatives(lambda x, w, b: F.group_norm(x, 3, w, b), outer))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("x_layout, g_layout", [(x, g) for x in ("contiguous", "channels-last")
                                                for g in ("contiguous", "channels-last")])
def test_instance_norm_is_group_norm_in_any_memory_layout(device, x_layout, g_layout):
    """The channels-last candidate (benchmarks/step_variants.py) feeds the norm channels-last activations, and its
    gradients come back in either layout: the norm must not depend on either."""
    torch.manual_seed(0)
    layout = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last}
    x = (torch.randn(2, 3, 5, 5, dtype=torch.float64, device=device) * 2 + 3).contiguous(
        memory_format=layout[x_layout]).requires_grad_()
    w = torch.rand(3, dtype=torch.float64, device=device).add(0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    g = torch.randn(2, 3, 5, 5, dtype=torch.float64, device=device).contiguous(memory_format=layout[g_layout])

    def derivatives(norm):  # first derivatives for the gradient g, then those differentiated, as the outer step does
        first = torch.autograd.grad(norm(x, w, b), (x, w, b), g, create_graph=True)
        return first, torch.autograd.grad(sum((d.cos() * d).sum() for d in first), (x, w))  # b: its own, none

    torch.testing.assert_close(derivatives(instance_norm), derivatives(lambda x, w, b: F.group_norm(x, 3, w, b)))


@pytest.mark.parametrize("size", [26, 11, 3])
def test_max_pool_without_autograd_is_max_pool2d(size):
    x = torch.randn(2, 4, size, size)
    assert torch.equal(max_pool(x), torch.nn.functional.max_pool2d(x, 2))


def test_mask_must_match_rln():
    with pytest.raises(ValueError, match="mask size"):
        ANML(256, 112, 1000)


def test_checkpoint_round_trip(tmp_path):
    model = ANML(16, 8, 144)
    path = tmp_path / checkpoint_name("anml", (16, 8, 144), 7)
    torch.save(model.state_dict(), path)
    assert parse_checkpoint_name(path) == ("anml", (16, 8, 144), 7)
    loaded = load_model(path)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_sanml_checkpoint_round_trip(tmp_path):
    model = SANML(16)
    assert not hasattr(model, "nm") and model.fc.weight.shape == (1000, 144)
    path = tmp_path / checkpoint_name("sanml", (16,), 7)
    assert path.name == "16_SANML-7.pth"
    torch.save(model.state_dict(), path)
    assert parse_checkpoint_name(path) == ("sanml", (16,), 7)
    loaded = load_model(path)
    assert isinstance(loaded, SANML)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    wrong = tmp_path / "16_16_144_ANML-7.pth"  # an SANML's weights under an ANML's name
    torch.save(model.state_dict(), wrong)
    with pytest.raises(ValueError, match=r"do not match an ANML\(16, 16, 144\)"):
        load_model(wrong)


def test_oml_is_the_anml_codes_oml():
    model = OML()
    x = torch.rand(2, 1, 28, 28)
    assert model.rln(x).shape == (2, 2304) and model.features(x).shape == (2, 1024) and model(x).shape == (2, 1000)
    assert model.fc is model.pln.fc
    convs = [m for m in model.rln if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [1, 1, 1, 2, 1, 2] and all(c.out_channels == 256 for c in convs)
    assert not any(isinstance(m, (torch.nn.GroupNorm, torch.nn.MaxPool2d)) for m in model.modules())
    for layer in (convs[1], model.pln.hidden):  # Kaiming-normal weights, zero biases
        assert layer.weight.std().item() == pytest.approx((2 / layer.weight[0].numel()) ** 0.5, rel=0.05)
        assert not layer.bias.any()
    assert [p for p in model.inner_parameters()] == list(model.pln.parameters())


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_model(tmp_path / "model.pth")  # a path that is not there, whatever its name
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_model(tmp_path / "16_8_144_ANML-1.pth")
    torch.save(ANML(16, 8, 144).state_dict(), tmp_path / "model.pth")
    with pytest.raises(ValueError, match="name must look like"):
        load_model(tmp_path / "model.pth")
    wrong = tmp_path / "32_8_288_ANML-1.pth"
    torch.save(ANML(16, 8, 144).state_dict(), wrong)
    with pytest.raises(ValueError, match="do not match"):
        load_model(wrong)
