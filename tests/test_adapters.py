"""Adapter methods x tiny models: parameter counts, identity at init, save/load, merge.

Plain torch, no Ray: every registered method on a tiny ViT and a tiny ResNet, fed real
images (scikit-learn's digits, upscaled to 32x32).

    .venv/bin/python -m pytest -q tests/test_adapters.py
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from system.adapters.registry import ADAPTERS, adapter_bytes, count_parameters, get_adapter, load_adapter
from system.config import FinetuneConfig

METHODS = ["full", "linear", "norm", "lora", "dora", "pissa", "loha", "ia3", "svfit"]
MODELS = {
    # A ViT's default targets: qkv, proj, fc1, fc2 and the patch embedding's Conv2d `proj`.
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}),
    # zero_init_last=False: a zero-initialised last BN per block would make the residual
    # branches (and so the adapters' effect on them) vanish at random init.
    "resnet": ("test_resnet", {"zero_init_last": False}),
}
NORMS = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)


def make(model: str) -> nn.Module:
    torch.manual_seed(0)
    name, kwargs = MODELS[model]
    return timm.create_model(name, num_classes=0, **kwargs).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    from sklearn.datasets import load_digits

    digits = torch.tensor(load_digits().images[:16], dtype=torch.float32) / 16.0
    gray = nn.functional.interpolate(digits[:, None], size=32, mode="bilinear")
    return ((gray - 0.5) / 0.25).expand(-1, 3, -1, -1).contiguous()


def targets(model: nn.Module, linear_only: bool = False) -> dict[str, nn.Module]:
    """The default targets, written out independently of the adapters' code."""
    vit = any(n.endswith(".qkv") for n, _ in model.named_modules())
    suffixes = (".qkv", ".proj", ".fc1", ".fc2") if vit else None
    out = {}
    for name, module in model.named_modules():
        hit = name.endswith(suffixes) if vit else (name.rsplit(".", 1)[-1][:4] == "conv" and "." in name)
        if (
            hit
            and isinstance(module, (nn.Linear, nn.Conv2d))
            and not (linear_only and isinstance(module, nn.Conv2d))
        ):
            out[name] = module
    return out


def fan_in(module: nn.Module) -> int:
    return module.weight[0].numel()  # in_features, or in_channels x kh x kw


def norm_parameters(model: nn.Module) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, NORMS) for p in m.parameters())


def expected_trainable(method: str, model: nn.Module, cfg: FinetuneConfig) -> int:
    total = sum(p.numel() for p in model.parameters())
    lora = lambda mods: sum(  # noqa: E731  r·(fan_in + out): A is r x fan_in, B is out x r
        min(cfg.rank, m.weight.shape[0], fan_in(m)) * (fan_in(m) + m.weight.shape[0]) for m in mods.values()
    )
    if method == "full":
        return total
    if method == "linear":
        return 0
    if method == "norm":
        return norm_parameters(model)
    if method == "lora":
        return lora(targets(model))
    if method == "dora":  # plus one magnitude per output
        return lora(targets(model)) + sum(m.weight.shape[0] for m in targets(model).values())
    if method == "pissa":
        return lora(targets(model, linear_only=True))
    if method == "loha":  # two LoRA pairs per target, multiplied elementwise
        return 2 * lora(targets(model))
    if method == "ia3":  # one scale per output, per input for a ViT's fc2
        return sum(fan_in(m) if n.endswith(".fc2") else m.weight.shape[0] for n, m in targets(model).items())
    if method == "svfit":  # the fewest singular values holding `energy` of sum(S²), per target
        count = 0
        for module in targets(model).values():
            s = np.linalg.svd(
                module.weight.detach().reshape(module.weight.shape[0], -1).double().numpy(), compute_uv=False
            )
            count += int(np.argmax(np.cumsum(s**2) / np.sum(s**2) >= cfg.energy - 1e-12)) + 1
        return count + (norm_parameters(model) if cfg.train_norms else 0)
    raise AssertionError(f"no formula for {method}: add one with the new method")


def test_every_registered_method_is_in_the_matrix():
    assert set(ADAPTERS) == set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_options_are_finetune_keys_and_exclusive_ones_need_their_method(method):
    """A method's options are `finetune.*` keys; an exclusive one of another method is refused."""
    from system.config import ConfigError, load_config
    from system.options import marks

    own = ADAPTERS[method].options.model_fields if ADAPTERS[method].options else {}
    assert set(own) <= set(FinetuneConfig.model_fields)
    for key, info in FinetuneConfig.model_fields.items():
        if marks(info).get("exclusive") and key not in own and info.annotation is bool:
            with pytest.raises(
                ConfigError, match=f"^finetune.{key}: needs finetune.method .*, not {method}$"
            ):
                load_config(None, [f"finetune.method={method}", f"finetune.{key}=true"])


def cases():
    for model in MODELS:
        for method in METHODS:
            if (model, method) == ("resnet", "pissa"):
                continue  # peft's PiSSA needs 2-D weights: refused, see test_pissa_refuses_convs
            yield pytest.param(method, model, {}, id=f"{method}-{model}")
        yield pytest.param("svfit", model, {"train_norms": True}, id=f"svfit+norms-{model}")


def train_a_little(model: nn.Module, images: torch.Tensor) -> None:
    """What a few optimizer steps do: every trainable weight moves, BatchNorm statistics too."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p) * (p.abs().mean() + 0.1))
    model.train()
    for layer in model.modules():  # frozen BatchNorms keep their statistics, as in train.py
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and not layer.weight.requires_grad:
            layer.eval()
    with torch.no_grad():
        model(images)
    model.eval()


@pytest.mark.parametrize("method, model_name, options", list(cases()))
def test_adapter_contract(method, model_name, options, images, tmp_path):
    cfg = FinetuneConfig(method=method, **options)
    base = make(model_name)
    with torch.no_grad():
        reference = base(images)
    adapter = get_adapter(method)
    adapted = adapter.apply(make(model_name), cfg).eval()

    # 1. Only the formula's parameters train (the head is the objective's, not counted here).
    trainable, _ = count_parameters(adapted)
    assert trainable == expected_trainable(method, base, cfg)
    # 2. At initialisation the adapted model computes what the base model computes.
    with torch.no_grad():
        torch.testing.assert_close(adapted(images), reference, atol=1e-4, rtol=0)

    train_a_little(adapted, images)
    with torch.no_grad():
        after = adapted(images)
    if trainable:  # training did change the function (linear's backbone stays as it was)
        assert (after - reference).abs().max() > 1e-3

    # 3. Save -> load onto fresh base weights -> same outputs; the adapter is small.
    if adapter.save_adapter is not None:
        adapter.save_adapter(adapted, tmp_path)
        size = adapter_bytes(tmp_path)
        # PiSSA saves as a rank-2r LoRA on the original base; svfit keeps s₀ beside s, and its
        # BatchNorms' running statistics when it trains them.
        per_param = 8 if method in ("pissa", "svfit") else 4
        assert 0 < size < per_param * max(trainable, 1) + 16_384
        loaded = load_adapter(make(model_name), tmp_path).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), after, atol=1e-4, rtol=0)

    # 4. The merged plain timm model equals the adapted one, and has the base's parameter names.
    merged = adapter.export(adapted).eval()
    assert set(merged.state_dict()) == set(base.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(images), after, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["lora", "loha", "svfit"])
def test_rank_pattern_and_budget(method):
    """Per-module ranks by regex, and the global budget multiplier on top."""
    model = make("vit")
    cfg = FinetuneConfig(
        method=method, rank=4, energy=None, rank_pattern={r"blocks\.0\..*": 2}, rank_scale=2.0
    )
    adapted = get_adapter(method).apply(make("vit"), cfg)
    ranks = {name: 4 if name.startswith("blocks.0.") else 8 for name in targets(model)}
    per_rank = {n: fan_in(m) + m.weight.shape[0] for n, m in targets(model).items()}
    if method == "svfit":
        assert count_parameters(adapted)[0] == sum(ranks.values())
    else:  # LoHa: two LoRA pairs per target
        pairs = 2 if method == "loha" else 1
        assert count_parameters(adapted)[0] == pairs * sum(ranks[n] * per_rank[n] for n in ranks)


def test_svfit_keeps_the_energy_share():
    """Lower energy keeps fewer singular values; the kept ones hold at least that share."""
    model = make("vit")
    few = count_parameters(get_adapter("svfit").apply(make("vit"), FinetuneConfig(energy=0.5)))[0]
    many = count_parameters(get_adapter("svfit").apply(make("vit"), FinetuneConfig(energy=0.99)))[0]
    assert len(targets(model)) <= few < many


def test_bad_targets_name_the_key():
    with pytest.raises(ValueError, match="^finetune.target_modules: .*matches no"):
        get_adapter("lora").apply(make("vit"), FinetuneConfig(target_modules=r"nothing\.here"))
    with pytest.raises(ValueError, match="^finetune.method: unknown method 'lorra'"):
        get_adapter("lorra")


def test_pissa_refuses_convs():
    with pytest.raises(ValueError, match="^finetune.target_modules: no Linear layer"):
        get_adapter("pissa").apply(make("resnet"), FinetuneConfig(method="pissa"))
    with pytest.raises(ValueError, match="^finetune.target_modules: pissa adapts Linear layers only"):
        get_adapter("pissa").apply(make("vit"), FinetuneConfig(method="pissa", target_modules=r".*proj"))


def test_svfit_adapter_refuses_other_base(tmp_path, images):
    adapted = get_adapter("svfit").apply(make("vit"), FinetuneConfig(method="svfit"))
    get_adapter("svfit").save_adapter(adapted, tmp_path)
    torch.manual_seed(5)
    other = timm.create_model(MODELS["vit"][0], num_classes=0, **MODELS["vit"][1])
    with pytest.raises(ValueError, match="trained on other base weights"):
        load_adapter(other, tmp_path)


@pytest.mark.parametrize(
    "method, warned", [("lora", True), ("svfit", True), ("norm", False), ("full", False)]
)
def test_adapting_a_random_backbone_is_warned_about(method, warned, digits_data, capsys):
    from system.config import build_config
    from system.train import plan_run

    tree = {"data": {"train": digits_data[0]}, "model": {"name": "test_resnet"}}
    tree["finetune"] = {"method": method}
    plan_run(build_config(tree), "finetune")
    said = capsys.readouterr().err
    assert ("without model.init or model.pretrained" in said) == warned, said


@pytest.mark.parametrize("limit, warned", [(3, True), (400, False), (None, False)])
def test_a_limit_that_keeps_few_classes_is_warned_about(limit, warned, digits_data, capsys):
    """data.limit keeps the first rows: on a file sorted by class, one class (CIFAR-10 as shipped)."""
    from system.config import build_config
    from system.train import plan_run

    tree = {"data": {"train": digits_data[0], "limit": limit}, "model": {"name": "test_resnet"}}
    tree["train"] = {"batch_size": 2, "workers": 1}
    plan_run(build_config({**tree, "finetune": {"method": "full"}}), "finetune")
    said = capsys.readouterr().err
    assert ("data.limit keeps the first" in said) == warned, said
