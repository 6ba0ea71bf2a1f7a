"""MEFTConfig validation: bad settings name the argument and the allowed range."""

import pytest

from meft_triton import MEFTConfig, meft_num_experts


def test_defaults_and_derived_sizes():
    cfg = MEFTConfig(num_neurons=1024, num_experts=16, experts_per_token=4, topk=32)
    assert cfg.neurons_per_expert == 64 and cfg.num_candidates == 256
    assert MEFTConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.low_key_dim is None


def test_topk_may_exceed_the_candidates_up_to_num_neurons():
    cfg = MEFTConfig(num_neurons=64, num_experts=16, experts_per_token=2, topk=64)
    assert cfg.num_candidates == 8 and cfg.topk == 64
    assert MEFTConfig(num_neurons=64, num_experts=16, experts_per_token=2, topk=9).topk == 9


def test_low_key_dim_is_serialised_and_compared():
    cfg = MEFTConfig(num_neurons=64, num_experts=8, experts_per_token=2, topk=4, low_key_dim=16)
    assert cfg.to_dict()["low_key_dim"] == 16
    assert MEFTConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg != cfg.replace(low_key_dim=None) and cfg != cfg.replace(low_key_dim=8)


@pytest.mark.parametrize("changes, error, match", [
    (dict(num_neurons=100, num_experts=16), ValueError, "must be divisible by num_experts"),
    (dict(topk=1025), ValueError, r"topk must be in \[1, num_neurons=1024\], got 1025"),
    (dict(topk=0), ValueError, "topk must be an int >= 1"),
    (dict(low_key_dim=0), ValueError, "low_key_dim must be an int >= 1, got 0"),
    (dict(low_key_dim=-3), ValueError, "low_key_dim must be an int >= 1"),
    (dict(low_key_dim=8.0), TypeError, "low_key_dim must be an int"),
    (dict(low_key_dim=True), TypeError, "low_key_dim must be an int"),
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


def test_meft_num_experts_is_the_original_rule():
    """ceil(sqrt(N)) // factor, as MEFT's KVLlamaMLP computes it (moe_expert_factor)."""
    assert meft_num_experts(8464) == 368  # sqrt = 92, / 0.25: 368 experts of 23 neurons
    assert meft_num_experts(8464, factor=1) == 92
    assert meft_num_experts(4096, factor=0.5) == 128
    assert meft_num_experts(65536) == 1024
    assert meft_num_experts(4032, factor=1) == 64  # sqrt(4032) = 63.5: the ceiling, 64, divides 4032


@pytest.mark.parametrize("num_neurons, factor, nearby", [
    (8465, 0.25, "num_neurons=8464 or 8556 works"),
    (100, 0.25, "num_neurons=72 or 144 works"),
    (7, 0.25, "num_neurons=16 works"),
    (5, 1000.0, "no nearby num_neurons works"),
])
def test_meft_num_experts_names_nearby_sizes_that_work(num_neurons, factor, nearby):
    with pytest.raises(ValueError, match=f"num_neurons={num_neurons} with factor={factor} gives .* experts, "
                                         f"which does not divide num_neurons.*{nearby}"):
        meft_num_experts(num_neurons, factor)
    for n in (int(s) for s in nearby.removeprefix("num_neurons=").removesuffix(" works").split(" or ")
              if s.isdigit()):
        assert n % meft_num_experts(n, factor) == 0


@pytest.mark.parametrize("args, error, match", [
    ((0,), ValueError, "num_neurons must be an int >= 1"),
    ((64.0,), TypeError, "num_neurons must be an int"),
    ((64, 0), ValueError, "factor must be a finite number > 0"),
    ((64, float("inf")), ValueError, "factor must be a finite number > 0"),
    ((64, True), ValueError, "factor must be a finite number > 0"),
])
def test_meft_num_experts_rejects_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        meft_num_experts(*args)


def test_paper_7b_preset():
    cfg = MEFTConfig.paper_7b()
    assert (cfg.num_neurons, cfg.num_experts, cfg.neurons_per_expert) == (8464, 368, 23)
    assert (cfg.experts_per_token, cfg.topk, cfg.gate, cfg.low_key_dim) == (8, 64, "logit", None)
    assert MEFTConfig.paper_7b(placement="cpu", low_key_dim=128) == cfg.replace(placement="cpu", low_key_dim=128)
    with pytest.raises(ValueError, match="topk must be in"):
        MEFTConfig.paper_7b(topk=8465)
