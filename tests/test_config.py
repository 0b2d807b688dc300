import pytest

from pipeline.config import AlignConfig, ConfigError, load_config, parse_override


def test_defaults_round_trip_through_a_plain_dict():
    cfg = load_config(None, ["train.lr=1e-6", "loss.beta=100", "tune.search_space={loss.beta: [1000, 5000]}"])
    assert cfg.train.lr == 1e-6 and cfg.loss.beta == 100.0
    again = AlignConfig.from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again.train, type(cfg.train))


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: exp\nloss:\n  objective: dpo\n  beta: 2500\ntrain:\n  lr: 1e-5\n")
    cfg = load_config(path, ["loss.beta=5000"])
    assert (cfg.name, cfg.loss.objective, cfg.loss.beta, cfg.train.lr) == ("exp", "dpo", 5000.0, 1e-5)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("trian.lr=1", "unknown config key 'trian'"),
        ("train.max_steps=ten", "config key 'train.max_steps': expected an integer, got 'ten'"),
        ("train.max_steps=1.5", "expected an integer"),
        ("train.use_gpu=maybe", "config key 'train.use_gpu': expected true or false"),
        ("loss.objective=ppo", "config key 'loss.objective': 'ppo' is not one of ['rpo', 'dpo', 'sft']"),
        ("loss.alpha=1.5", "config key 'loss.alpha': 1.5 is not allowed; accepted: a number in [0, 1]"),
        ("loss.tau=0", "config key 'loss.tau'"),
        ("precompute.resolution=100", "a positive multiple of 8"),
        ("train.zero_stage=0", "config key 'train.zero_stage': 0 is not one of ['auto', 1, 2, 3]"),
        ("train.precision=bf16", "needs GPUs"),
        ("tune.search_space={loss.betta: [1]}", "unknown config key 'loss.betta'"),
        ("evaluate.tie_margins={stlye: 0.1}", "config key 'evaluate.tie_margins.stlye'"),
        ("evaluate.tie_margins={style: -1}", "config key 'evaluate.tie_margins.style': -1 is not allowed"),
        ("model.clip_pretrained=", "config key 'model.clip_pretrained'"),
    ],
)
def test_bad_values_name_the_key_and_what_is_accepted(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_impossible_combination_is_refused():
    with pytest.raises(ConfigError, match="offload needs AdamW"):
        load_config(None, ["train.offload_optimizer=true", "train.optimizer=adafactor"])


def test_override_values_are_read_as_yaml():
    assert parse_override("train.lr=1e-6") == ("train.lr", 1e-6)
    assert parse_override("train.use_gpu=true") == ("train.use_gpu", True)
    assert parse_override("name=exp-1") == ("name", "exp-1")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("train.lr")


def test_yaml_11_words_stay_words_on_the_command_line():
    # YAML 1.1 would read these as booleans; a run called "off" or "no" is a name.
    assert load_config(None, ["name=off"]).name == "off"
    assert load_config(None, ["name=No"]).name == "No"
    assert load_config(None, ["name=2024"]).name == "2024"
    cfg = load_config(None, ["train.gradient_checkpointing=on", "train.use_gpu=no"])
    assert cfg.train.gradient_checkpointing is True and cfg.train.use_gpu is False


def test_missing_or_bad_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_the_toy_style_scorer_is_refused_outside_the_toy_world(tmp_path):
    hub = ["model.pretrained=stabilityai/stable-diffusion-xl-base-1.0", "data.source=s3://bucket/pickapic"]
    with pytest.raises(ConfigError, match="'style' is the toy world's style scorer"):
        load_config(None, hub)  # the default scorers are [style, clip]
    load_config(None, [*hub, "evaluate.scorers=[clip]", "realign.gate_scorer=clip"])
    load_config(None, ["model.pretrained=tiny", "data.source=/data/toy-shards"])  # a toy model: style judges it
    toy_folder = tmp_path / "toy_base"
    toy_folder.mkdir()
    (toy_folder / "toy_base.json").write_text("{}")
    load_config(None, [f"model.pretrained={toy_folder}", "data.source=/data/toy-shards"])


def test_the_embedded_default_uses_the_fitted_toy_clip_and_random_is_explicit():
    assert load_config(None).model.clip_pretrained == "toy"
    assert load_config(None, ["model.clip_pretrained=random"]).model.clip_pretrained == "random"
    with pytest.raises(ConfigError, match="'toy' is the toy world's fit"):
        load_config(None, ["model.clip_model=ViT-H-14"])


def test_production_configs_evaluate_with_gpu_actors_and_the_published_scorers():
    from pathlib import Path

    for name in ("sdxl_pickapic.yaml", "realign_sdxl.yaml"):
        cfg = load_config(Path(__file__).parents[1] / "jobs" / "configs" / name)
        assert cfg.generate.actor_num_gpus >= 1 and cfg.evaluate.actor_num_gpus >= 1, name
        assert cfg.generate.resolution == 1024 and "style" not in cfg.evaluate.scorers, name
        assert set(cfg.evaluate.scorers) == {"pickscore", "hpsv2", "imagereward", "aesthetic", "clip"}, name
        for scorer in ("pickscore", "hpsv2", "imagereward", "aesthetic"):
            assert getattr(cfg.evaluate, scorer).weights, (name, scorer)
        assert (cfg.evaluate.clip.arch, cfg.evaluate.clip.weights) == ("ViT-H-14", "laion2b_s32b_b79k"), name


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "jobs" / "configs").glob("*.yaml"))
    assert configs, "jobs/configs/ ships at least one config"
    for path in configs:
        text = path.read_text()
        assert text.startswith("# "), f"{path} starts with the command that uses it"
        load_config(path)


def test_toy_config_is_the_embedded_default():
    from pathlib import Path

    toy = Path(__file__).parents[1] / "jobs" / "configs" / "toy.yaml"
    assert load_config(toy) == load_config(None)  # `python jobs/align.py` with no --config runs toy.yaml
