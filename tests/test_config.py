"""MEFTConfig validation: bad settings name the argument and the allowed range."""

import pytest

from meft_triton import MEFTConfig


def test_defaults_and_derived_sizes():
    cfg = MEFTConfig(num_neurons=1024, num_experts=16, experts_per_token=4, topk=32)
    assert cfg.neurons_per_expert == 64 and cfg.num_candidates == 256
    assert MEFTConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("changes, error, match", [
    (dict(num_neurons=100, num_experts=16), ValueError, "must be divisible by num_experts"),
    (dict(topk=300), ValueError, r"topk must be in \[1, .* = 256\]"),
    (dict(experts_per_token=17), ValueError, r"experts_per_token must be in \[1, num_experts=16\]"),
    (dict(num_neurons=0), ValueError, "num_neurons must be an int >= 1"),
    (dict(num_experts=-4), ValueError, "num_experts must be an int >= 1"),
    (dict(topk=2.0), TypeError, "topk must be an int"),
    (dict(experts_per_token=True), TypeError, "experts_per_token must be an int"),
    (dict(gate="sigmoid"), ValueError, "gate must be one of"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(key_init_std=-1.0), ValueError, "key_init_std must be a finite number"),
    (dict(router_init_scale=float("nan")), ValueError, "router_init_scale must be a finite number"),
])
def test_rejects_bad_settings(changes, error, match):
    settings = dict(num_neurons=1024, num_experts=16, experts_per_token=4, topk=32)
    settings.update(changes)
    with pytest.raises(error, match=match):
        MEFTConfig(**settings)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown MEFTConfig fields: colour"):
        MEFTConfig.from_dict({"colour": "red"})
