"""The built-in models, the per-dataset defaults and loading of user models.

Every factory takes ``(input_shape, num_classes)``, where ``input_shape`` excludes the batch
dimension, and initialises its weights from the global torch RNG only, so seeding it before
:func:`build_model` gives the same initial model on every rank.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import shutil
import sysconfig
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from psops_mpi.errors import UsageError
from psops_mpi.factories import call_factory, load_callable, summary, torchvision_or_none
from psops_mpi.tasks import Classification, Task

Factory = Callable[[tuple[int, ...], int], nn.Module]


def _conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _need_dims(name: str, input_shape: tuple[int, ...], dims: tuple[int, ...]) -> None:
    if len(input_shape) not in dims:
        want = " or ".join(str(d) for d in dims)
        raise UsageError(f"{name} needs inputs of {want} dimension(s), got {len(input_shape)}")


def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two hidden layers of 256 units on the flattened input; suits any input shape."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, num_classes),
    )


def mlp_wide(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two hidden layers of 1024 units: over 1M parameters on any input (1.1M on MNIST-1D),
    with little compute per parameter, so synchronisation traffic dominates a step."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 1024), nn.ReLU(),
        nn.Linear(1024, 1024), nn.ReLU(),
        nn.Linear(1024, num_classes),
    )


class _CNN1D(nn.Module):
    """ConvBase of the MNIST-1D paper (Greydanus 2020): three strided convs and a linear."""

    def __init__(self, channels: int, length: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(channels, 32, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        )
        out = _conv_out(_conv_out(_conv_out(length, 5, 2, 1), 3, 2, 1), 3, 2, 1)
        self.linear = nn.Linear(32 * out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # (B, L) signals, as mnist1d stores them, get a channel axis
            x = x.unsqueeze(1)
        return self.linear(self.features(x).flatten(1))


def cnn1d(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """MNIST-1D CNN for (C, L) or (L,) signals with L >= 8 (published ~94% test accuracy)."""
    _need_dims("cnn1d", input_shape, (1, 2))
    if input_shape[-1] < 8:
        raise UsageError(f"cnn1d needs signals of length >= 8, got {input_shape[-1]}")
    channels = input_shape[0] if len(input_shape) == 2 else 1
    return _CNN1D(channels, input_shape[-1], num_classes)


def lenet(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """LeNet-5 with ReLU and max pooling for (C, H, W) images, 28x28 in the original."""
    _need_dims("lenet", input_shape, (3,))
    channels, height, width = input_shape
    # conv(pad 2) keeps the size, pool halves it, conv 5 removes 4, pool halves again
    flat_h, flat_w = ((s // 2 - 4) // 2 for s in (height, width))
    if min(flat_h, flat_w) < 1:
        raise UsageError(f"lenet needs images of at least 12x12, got {height}x{width}")
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * flat_h * flat_w, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    # no conv bias: the BatchNorm shift that follows makes it redundant
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Small fast CIFAR CNN: five 3x3 conv-BN-ReLU layers, three pools, global average pool."""
    _need_dims("cnn", input_shape, (3,))
    return nn.Sequential(
        *_conv_bn_relu(input_shape[0], 32), *_conv_bn_relu(32, 32), nn.MaxPool2d(2),
        *_conv_bn_relu(32, 64), *_conv_bn_relu(64, 64), nn.MaxPool2d(2),
        *_conv_bn_relu(64, 128), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(128, num_classes),
    )


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with the option-A (parameter-free) identity shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride = stride
        self.pad = c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        # option A: subsample spatially and zero-pad the new channels, half on each side
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _ResNetCifar(nn.Module):
    """CIFAR ResNet of He et al. 2016 with ``blocks`` basic blocks in each of 3 stages."""

    def __init__(self, channels: int, num_classes: int, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(channels, 16))
        layers: list[nn.Module] = []
        c_in = 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                layers.append(_BasicBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
        self.stages = nn.Sequential(*layers)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(x))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet20(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """ResNet-20 for (C, H, W) images (about 0.27M parameters with 10 classes)."""
    _need_dims("resnet20", input_shape, (3,))
    return _ResNetCifar(input_shape[0], num_classes)


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP, each residual."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, width)
        batch, length, width = x.shape
        # (B, T, 3 * width) -> three (B, heads, T, width / heads)
        q, k, v = (self.qkv(self.ln1(x)).view(batch, length, 3, self.num_heads, -1)
                   .permute(2, 0, 3, 1, 4))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.ln2(x))


class _GPT(nn.Module):
    """Decoder-only transformer on token ids (GPT-2 layout, dropout 0): learned positions,
    pre-LayerNorm blocks, and an output layer tied to the token embedding."""

    def __init__(self, context: int, vocab: int, num_layers: int, width: int,
                 num_heads: int) -> None:
        super().__init__()
        if width % num_heads:
            raise UsageError(f"gpt width {width} is not a multiple of its {num_heads} heads")
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(_Block(width, num_heads) for _ in range(num_layers)))
        self.ln_f = nn.LayerNorm(width)
        # GPT-2's initialisation; the projections into the residual stream shrink with depth
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.dim() == 2:
                deep = name.endswith(("proj.weight", "mlp.2.weight"))
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * num_layers) if deep else 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # idx: (B, T) int64 -> (B, T, vocab)
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.ln_f(self.blocks(self.tokens(idx) + self.positions(positions)))
        # tied by reuse, not by a second module holding the same tensor: one parameter, one
        # state-dict entry, one slice of the synchroniser's flat buffer
        return F.linear(x, self.tokens.weight)


def _gpt(name: str, input_shape: tuple[int, ...], vocab: int, num_layers: int, width: int,
         num_heads: int) -> nn.Module:
    _need_dims(name, input_shape, (1,))
    return _GPT(input_shape[0], vocab, num_layers, width, num_heads)


def gpt(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Small GPT for (T,) token ids, logits over ``num_classes`` tokens at every position:
    4 layers of width 256, 4 heads (3.26M parameters on fortunes: T 128, 256 bytes)."""
    return _gpt("gpt", input_shape, num_classes, num_layers=4, width=256, num_heads=4)


def gpt_tiny(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The GPT with 2 layers of width 64, 2 heads, for fast tests (0.12M on fortunes)."""
    return _gpt("gpt-tiny", input_shape, num_classes, num_layers=2, width=64, num_heads=2)


MODELS: dict[str, Factory] = {
    "mlp": mlp,
    "mlp-wide": mlp_wide,
    "cnn1d": cnn1d,
    "lenet": lenet,
    "cnn": cnn,
    "resnet20": resnet20,
    "gpt": gpt,
    "gpt-tiny": gpt_tiny,
}

DEFAULT_MODELS: dict[str, str] = {
    "mnist1d": "cnn1d",
    "mnist": "lenet",
    "fashion-mnist": "lenet",
    "cifar10": "resnet20",
    "synthetic": "mlp",
    "imagefolder": "resnet20",
    "fortunes": "gpt",
}


def _check_args(input_shape: tuple[int, ...], num_classes: int) -> None:
    if not input_shape or not all(isinstance(s, int) and s > 0 for s in input_shape):
        raise UsageError(f"input shape must be positive integers, got {input_shape!r}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise UsageError(f"number of classes must be a positive integer, got {num_classes!r}")


def _resolve_auto(dataset: str | None) -> str:
    if dataset not in DEFAULT_MODELS:
        raise UsageError(f"model 'auto' has no default for dataset {dataset!r}; give --model "
                         f"(defaults exist for: {', '.join(DEFAULT_MODELS)})")
    return DEFAULT_MODELS[dataset]


def _call_user_factory(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    factory = load_callable("model", spec)
    model = call_factory("model", spec, factory, input_shape=input_shape,
                         num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise UsageError(f"model {spec!r}: the factory returned {type(model).__name__}, "
                         f"not a torch.nn.Module")
    return model


def _call_registered(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    try:
        return MODELS[name](input_shape, num_classes)
    except Exception as exc:  # a shape the architecture cannot be built for
        reason = str(exc) if isinstance(exc, UsageError) else summary(exc)
        raise UsageError(f"model {name!r} does not accept inputs of shape "
                         f"{input_shape}: {reason}") from None


def eval_forward(model: nn.Module, x: torch.Tensor) -> object:
    """One forward pass in eval mode (BatchNorm running statistics stay untouched) without
    gradients; the model's mode is restored, also when the model raises."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.train(was_training)


def _check_forward(name: str, model: nn.Module, input_shape: tuple[int, ...],
                   num_classes: int, task: Task) -> None:
    """Run one eval-mode forward pass on zeros so a shape mismatch fails now, clearly."""
    try:
        out = eval_forward(model, task.example_input(input_shape))
    except Exception as exc:
        raise UsageError(f"model {name!r} does not accept inputs of shape {input_shape}: "
                         f"{summary(exc)}") from None
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    expected = task.output_shape(input_shape, num_classes)
    if shape != expected:
        raise UsageError(f"model {name!r} gives outputs of shape {shape} for a batch of 2, "
                         f"expected {expected}")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int,
                dataset: str | None = None, task: Task | None = None) -> nn.Module:
    """Build a model by name and check that it accepts ``input_shape``.

    Args:
        name: A key of :data:`MODELS`, 'auto' (the default of ``dataset``),
            'torchvision:NAME' (``torchvision.models.get_model(NAME, num_classes=...)``) or
            'package.module:function', called with the keyword arguments it takes of
            ``input_shape`` and ``num_classes``.
        input_shape: Shape of one sample, without the batch dimension.
        num_classes: Number of output logits (a language model's vocabulary).
        dataset: Dataset name, needed only for 'auto'.
        task: What the model's output is for (default: classification): the shape check's
            input and expected output.

    Returns:
        The model, in train mode, initialised from the global torch RNG.

    Raises:
        UsageError: The name is unknown, the user factory fails, or the shapes do not fit.
    """
    input_shape = tuple(input_shape)
    _check_args(input_shape, num_classes)
    if name == "auto":
        name = _resolve_auto(dataset)
    if name in MODELS:
        model = _call_registered(name, input_shape, num_classes)
    elif name.startswith("torchvision:"):
        model = _torchvision_model(name, num_classes)
    elif ":" in name:
        model = _call_user_factory(name, input_shape, num_classes)
    else:
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}, 'auto', "
                         f"or give a user model as 'package.module:function'")
    _check_forward(name, model, input_shape, num_classes, task or Classification())
    return model


def _torchvision_model(spec: str, num_classes: int) -> nn.Module:
    """A model of torchvision's by name, untrained, with ``num_classes`` outputs."""
    tv = torchvision_or_none()
    if tv is None:
        raise UsageError(f"model {spec!r} needs torchvision, which does not import here; "
                         "install a torchvision that matches this torch (pip install "
                         "'psops_mpi[vision]') or choose another --model")
    name = spec.removeprefix("torchvision:")
    if name not in tv.models.list_models():
        raise UsageError(f"model {spec!r}: torchvision has no model {name!r}; see "
                         "torchvision.models.list_models()")
    try:
        return tv.models.get_model(name, weights=None, num_classes=num_classes)
    except Exception as exc:
        raise UsageError(f"model {spec!r}: torchvision could not build it with "
                         f"{num_classes} classes: {summary(exc)}") from None


def num_parameters(model: nn.Module) -> int:
    """Total number of parameter elements (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())


def apply_speed_settings(model: nn.Module, channels_last: str, compile_model: bool,
                         input_shape: tuple[int, ...], device: torch.device,
                         precision: str = "fp32") -> bool:
    """``--channels-last`` and ``--compile`` on the model (on ``device`` already); returns
    whether its batches go channels-last (what ``auto`` became).

    Channels-last: a forward pre-hook puts each batch into channels-last format; a
    convolution then runs in that format, converting its (small) weight on the way. The
    weights keep their layout, as they are views of the synchroniser's flat buffer, whose
    order the checkpoints store. ``auto`` turns it on for a model with 2-D convolutions on
    images of more than one channel, on CPUs and, at fp32, on GPUs: psops_mpi trained
    ResNet-20 1.16x and 1.20x faster so on a CPU (``bench/results/gpu_bench_cpu*.json``) and
    1.20x faster (median, 5 of 6 repeats) at fp32 on an H200, while under bf16 it was no
    faster there (1.0x, 3 of 6; ``bench/results/gpu/``; see docs/slurm-gpus.md). Compile:
    ``nn.Module.compile``, in place, so the parameter names (and checkpoints) stay as they
    are.

    Raises:
        UsageError: channels-last on for samples that are not images or for a model that
            fails on a channels-last batch (one that reshapes with ``.view``, say), or compile
            where torch.compile could not build its kernels.
    """
    use_channels_last = _use_channels_last(model, channels_last, input_shape, device,
                                           precision)
    if compile_model:
        missing = compile_missing(device)
        if missing:
            raise UsageError(f"--compile on the {device.type} needs {missing}: install it or "
                             "run without --compile")
    if use_channels_last:
        model.register_forward_pre_hook(_batch_to_channels_last)
    if compile_model:
        model.compile()
    return use_channels_last


def _use_channels_last(model: nn.Module, setting: str, input_shape: tuple[int, ...],
                       device: torch.device, precision: str) -> bool:
    if setting == "off":
        return False
    if setting == "auto" and not (
            len(input_shape) == 3 and input_shape[0] > 1
            and any(isinstance(m, nn.Conv2d) for m in model.modules())
            and (device.type == "cpu" or precision == "fp32")):
        return False
    if len(input_shape) != 3:
        raise UsageError(f"--channels-last on needs images (samples of shape C x H x W); "
                         f"these samples have shape {tuple(input_shape)}")
    error = _channels_last_error(model, input_shape, device)
    if error and setting == "on":
        raise UsageError(f"the model fails on a batch in channels-last format ({error}): "
                         "use --channels-last off")
    return error is None


def _channels_last_error(model: nn.Module, input_shape: tuple[int, ...],
                         device: torch.device) -> str | None:
    """Why an eval-mode forward of a channels-last batch of zeros fails, or None."""
    weight = next(model.parameters(), None)
    dtype = weight.dtype if weight is not None else torch.float32
    x = torch.zeros(2, *input_shape, dtype=dtype, device=device)
    try:
        eval_forward(model, x.contiguous(memory_format=torch.channels_last))
    except Exception as exc:
        return summary(exc)
    return None


def compile_missing(device: torch.device) -> str | None:
    """What torch.compile needs on this device to build its kernels and cannot find: a C++
    compiler on CPUs; Triton and a C compiler (for its launchers) on GPUs; Python's headers."""
    if device.type == "cpu":
        compilers = [os.environ.get("CXX", "g++")]
    elif importlib.util.find_spec("triton") is None:
        return "Triton (pip install triton)"
    else:
        compilers = [os.environ["CC"]] if os.environ.get("CC") else ["gcc", "clang"]
    if not any(shutil.which(c) for c in compilers):
        return f"a compiler on PATH ({' or '.join(compilers)})"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "Python's C headers (Python.h: the python3-dev package)"
    return None


def _batch_to_channels_last(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return None
