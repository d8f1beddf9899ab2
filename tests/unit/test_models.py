"""Unit tests of psops_mpi.models: the built-in models, 'auto' and user-model loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from psops_mpi.errors import UsageError
from psops_mpi.factories import torchvision_or_none
from psops_mpi.models import (
    DEFAULT_MODELS,
    MODELS,
    apply_speed_settings,
    build_model,
    compile_missing,
    num_parameters,
)
from psops_mpi.tasks import LanguageModel

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPILE_MISSING = compile_missing(torch.device("cpu"))  # what torch.compile lacks here, if any

# every registered model on the input shapes it is meant for
CASES = [
    ("cnn1d", (1, 40)),
    ("mlp", (1, 40)),
    ("lenet", (1, 28, 28)),
    ("mlp", (1, 28, 28)),
    ("cnn", (3, 32, 32)),
    ("resnet20", (3, 32, 32)),
    ("mlp", (3, 32, 32)),
    ("mlp", (32,)),
    ("mlp-wide", (1, 40)),
]
LANGUAGE_MODELS = ("gpt", "gpt-tiny")  # on token ids; tested in tests/unit/test_text.py


@pytest.fixture
def user_models_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make 'tests.helpers' importable whatever directory pytest was started from."""
    monkeypatch.syspath_prepend(str(REPO_ROOT))


def _usage_error(name: str, input_shape: tuple[int, ...] = (1, 40)) -> str:
    with pytest.raises(UsageError) as info:
        build_model(name, input_shape, 10)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_every_registered_model_is_covered() -> None:
    assert {name for name, _ in CASES} | set(LANGUAGE_MODELS) == set(MODELS)


@pytest.mark.parametrize(("name", "shape"), CASES)
def test_forward_and_backward(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    assert model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    out = model(torch.randn(4, *shape))
    assert out.shape == (4, 10)
    torch.nn.functional.cross_entropy(out, torch.arange(4)).backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname


@pytest.mark.parametrize(("name", "shape"), CASES)
def test_same_seed_gives_same_init(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(7)
    first = build_model(name, shape, 10).state_dict()
    torch.manual_seed(7)
    second = build_model(name, shape, 10).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_different_seed_gives_different_init() -> None:
    torch.manual_seed(1)
    first = build_model("cnn1d", (1, 40), 10).state_dict()
    torch.manual_seed(2)
    second = build_model("cnn1d", (1, 40), 10).state_dict()
    assert not torch.equal(first["linear.weight"], second["linear.weight"])


def test_resnet20_size() -> None:
    assert 260_000 <= num_parameters(build_model("resnet20", (3, 32, 32), 10)) <= 280_000


def test_mlp_wide_is_communication_heavy() -> None:
    # the benchmarks' >= 1M-parameter model: exactly two 1024-unit layers on MNIST-1D
    assert num_parameters(build_model("mlp-wide", (1, 40), 10)) == 1_101_834


def test_cnn1d_accepts_other_lengths_and_unbatched_channel() -> None:
    model = build_model("cnn1d", (1, 8), 3)
    assert model(torch.randn(2, 1, 8)).shape == (2, 3)
    model = build_model("cnn1d", (40,), 10)
    assert model(torch.randn(2, 40)).shape == (2, 10)


def test_lenet_other_square_size() -> None:
    assert build_model("lenet", (1, 32, 32), 10)(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_num_parameters_counts_elements() -> None:
    assert num_parameters(torch.nn.Linear(3, 2)) == 8


# What `--model auto` builds for each dataset, written out by hand from the manual
# (docs/data.md: "`--model auto` picks ...") and its Models table: the model's name and its
# parameter count.
AUTO = {
    "mnist1d": ("cnn1d", (1, 40), 8_010),
    "mnist": ("lenet", (1, 28, 28), 61_706),
    "fashion-mnist": ("lenet", (1, 28, 28), 61_706),
    "cifar10": ("resnet20", (3, 32, 32), 269_722),
    "synthetic": ("mlp", (32,), 32 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10),
    "fortunes": ("gpt", (128,), 3_257_856),
}
# the sets whose models are not 10-class classifiers: their outputs (classes) and task
AUTO_OUTPUTS = {"fortunes": (256, LanguageModel())}


def test_every_dataset_has_its_documented_default() -> None:
    from psops_mpi.config import DATASETS

    assert set(AUTO) == set(DATASETS)
    readme = (REPO_ROOT / "docs" / "data.md").read_text()
    assert ("`--model auto` picks `cnn1d` for mnist1d, `lenet` for (fashion-)mnist, `resnet20` "
            "for cifar10\nand imagefolder, `mlp` for synthetic, `gpt` for fortunes.") in readme
    assert DEFAULT_MODELS["imagefolder"] == "resnet20"


@pytest.mark.parametrize("dataset", sorted(AUTO))
def test_auto_builds_the_documented_default(dataset: str) -> None:
    name, shape, num_params = AUTO[dataset]
    num_classes, task = AUTO_OUTPUTS.get(dataset, (10, None))
    assert DEFAULT_MODELS[dataset] == name
    torch.manual_seed(3)
    auto = build_model("auto", shape, num_classes, dataset=dataset, task=task)
    torch.manual_seed(3)
    named = build_model(name, shape, num_classes, task=task)
    assert num_parameters(auto) == num_parameters(named) == num_params
    assert type(auto) is type(named)
    assert all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(),
                                                named.state_dict().values(), strict=True))


def test_auto_without_known_dataset() -> None:
    with pytest.raises(UsageError, match="auto"):
        build_model("auto", (1, 40), 10, dataset=None)


@pytest.mark.usefixtures("user_models_importable")
def test_user_model_builds() -> None:
    model = build_model("tests.helpers.user_models:tiny_mlp", (1, 40), 10)
    assert model(torch.zeros(3, 1, 40)).shape == (3, 10)


def test_unknown_name() -> None:
    message = _usage_error("nosuchmodel")
    assert "nosuchmodel" in message
    assert all(name in message for name in MODELS)
    assert "package.module:function" in message


def test_missing_module() -> None:
    message = _usage_error("psops_no_such_module:f")
    assert "psops_no_such_module" in message
    assert "ModuleNotFoundError: No module named 'psops_no_such_module'" in message


def test_module_with_syntax_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "psops_broken_syntax.py").write_text("def f(:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    message = _usage_error("psops_broken_syntax:f")
    assert "psops_broken_syntax" in message
    assert "SyntaxError" in message


def test_module_raising_at_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "psops_raises_on_import.py").write_text("raise KeyError('no config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    message = _usage_error("psops_raises_on_import:f")
    assert "psops_raises_on_import" in message
    assert "KeyError" in message


@pytest.mark.usefixtures("user_models_importable")
def test_missing_attribute() -> None:
    message = _usage_error("tests.helpers.user_models:no_such_factory")
    assert "no_such_factory" in message


@pytest.mark.usefixtures("user_models_importable")
def test_attribute_not_callable() -> None:
    assert "not callable" in _usage_error("tests.helpers.user_models:NOT_CALLABLE")


@pytest.mark.usefixtures("user_models_importable")
def test_factory_returns_non_module() -> None:
    message = _usage_error("tests.helpers.user_models:returns_int")
    assert "int" in message
    assert "nn.Module" in message


@pytest.mark.usefixtures("user_models_importable")
def test_factory_raises() -> None:
    assert "RuntimeError: boom" in _usage_error("tests.helpers.user_models:raises")


@pytest.mark.usefixtures("user_models_importable")
def test_user_model_that_rejects_the_input_shape() -> None:
    message = _usage_error("tests.helpers.user_models:fixed_input", (1, 40))
    assert "does not accept inputs of shape (1, 40)" in message


@pytest.mark.usefixtures("user_models_importable")
def test_user_model_with_wrong_output_shape() -> None:
    message = _usage_error("tests.helpers.user_models:wrong_output", (1, 40))
    assert "(2, 11)" in message
    assert "(2, 10)" in message


def test_lenet_on_1d_input() -> None:
    message = _usage_error("lenet", (1, 40))
    assert "lenet" in message
    assert "does not accept inputs of shape (1, 40)" in message


def test_forward_check_restores_train_mode() -> None:
    assert build_model("cnn", (3, 32, 32), 10).training


def test_bad_input_shape() -> None:
    with pytest.raises(UsageError, match="input shape"):
        build_model("mlp", (0, 4), 10)


# ---- --channels-last and --compile

def speed(model: torch.nn.Module, channels_last: str, input_shape: tuple[int, ...],
          device: str = "cpu", compile_model: bool = False) -> bool:
    return apply_speed_settings(model, channels_last, compile_model, input_shape,
                                torch.device(device))


@pytest.mark.parametrize(("name", "shape", "device", "want"), [
    ("resnet20", (3, 32, 32), "cpu", True),
    ("cnn", (3, 32, 32), "cpu", True),
    ("lenet", (1, 28, 28), "cpu", False),  # one channel: the same layout either way
    ("mlp", (3, 32, 32), "cpu", False),  # no convolution to gain
    ("cnn1d", (1, 40), "cpu", False),  # not an image
    pytest.param("resnet20", (3, 32, 32), "cuda", True,  # faster at fp32 on an H200 too
                 marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                          reason="needs a CUDA device")),
])
def test_channels_last_auto(name: str, shape: tuple[int, ...], device: str, want: bool) -> None:
    model = build_model(name, shape, 10).to(device)
    assert speed(model, "auto", shape, device) is want
    assert bool(model._forward_pre_hooks) is want
    assert speed(build_model(name, shape, 10).to(device), "off", shape, device) is False
    if device == "cuda":  # not under bf16 on a GPU, where it measured no faster
        assert apply_speed_settings(build_model(name, shape, 10).to(device), "auto", False,
                                    shape, torch.device(device), "bf16") is False


def test_a_model_that_fails_on_channels_last_batches_is_left_contiguous_or_refused(
        user_models_importable: None) -> None:
    """A model that flattens with ``.view`` fails on a channels-last batch: auto leaves it
    alone, and --channels-last on says so before training."""
    name = "tests.helpers.user_models:view_flatten_cnn"
    model = build_model(name, (3, 8, 8), 10)
    assert speed(model, "auto", (3, 8, 8)) is False and not model._forward_pre_hooks
    model(torch.zeros(2, 3, 8, 8))  # and it still works as it did
    with pytest.raises(UsageError, match=r"fails on a batch in channels-last format \(.*view"
                                         r".*\): use --channels-last off"):
        speed(model, "on", (3, 8, 8))


def test_channels_last_batches_reach_the_convolutions_and_change_no_result() -> None:
    """The first convolution sees a channels-last batch; outputs and gradients match the
    model without the setting, and the weights keep their contiguous layout and storage.
    (In float64: in float32, either layout's gradients are ~1e-3 from the exact ones, and
    differ by as much from each other with the number of threads.)"""
    torch.manual_seed(0)
    plain = build_model("resnet20", (3, 32, 32), 10).double()
    fast = build_model("resnet20", (3, 32, 32), 10).double()
    fast.load_state_dict(plain.state_dict())
    assert speed(fast, "on", (3, 32, 32))
    seen = []
    first_conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    weight_ptr = first_conv.weight.data_ptr()
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    outs = []
    for model in (plain, fast):
        out = model(x)
        out.square().sum().backward()
        outs.append(out)
    assert x.is_contiguous() and seen[0].is_contiguous(memory_format=torch.channels_last)
    assert not seen[0].is_contiguous()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-11, msg=name)
        assert q.is_contiguous() and q.grad.is_contiguous(), name
    assert first_conv.weight.data_ptr() == weight_ptr


def test_channels_last_on_refuses_samples_that_are_not_images() -> None:
    model = build_model("cnn1d", (1, 40), 10)
    with pytest.raises(UsageError, match=r"--channels-last on needs images .*\(1, 40\)"):
        speed(model, "on", (1, 40))


def test_compile_on_the_cpu_without_a_compiler_is_refused_before_training(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    model = build_model("mlp", (1, 40), 10)
    with pytest.raises(UsageError, match=r"--compile on the cpu needs a compiler on PATH "
                                         r"\(no-such-compiler-here\)"):
        speed(model, "off", (1, 40), compile_model=True)
    assert getattr(model, "_compiled_call_impl", None) is None  # left as it was


@pytest.mark.skipif(COMPILE_MISSING is not None,
                    reason=f"torch.compile on the CPU needs {COMPILE_MISSING}")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")  # torch's own, on import
def test_compile_is_in_place_and_keeps_the_names_checkpoints_store() -> None:
    """A checkpoint of a compiled run continues without --compile, and the other way round:
    the compiled model's parameter and buffer names are the model's own."""
    model = build_model("resnet20", (3, 32, 32), 10)
    names = list(model.state_dict())
    speed(model, "off", (3, 32, 32), compile_model=True)  # compiles lazily: costs nothing yet
    assert list(model.state_dict()) == names
    assert getattr(model, "_compiled_call_impl", None) is not None


@pytest.mark.skipif(torchvision_or_none() is not None, reason="torchvision imports here")
def test_a_torchvision_model_without_torchvision_is_one_line() -> None:
    with pytest.raises(UsageError, match="model 'torchvision:resnet18' needs torchvision, which "
                                         "does not import here"):
        build_model("torchvision:resnet18", (3, 32, 32), 10)
