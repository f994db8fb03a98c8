"""Typed method options: declared once, installed into the yacs node, validated once, help printed."""

from __future__ import annotations

import pytest

import trainers  # noqa: F401  registers every trainer
from restore.engine.config import ConfigError, extend_cfg, get_cfg_default, merge_file, merge_opts
from restore.engine.registry import TRAINER_REGISTRY
from restore.options import Option, Options, main

TABLE = Options(
    Option("MODE", "a", "which mode", choices=("a", "b")),
    Option("WEIGHT", 1.0, "a weight", minimum=0, maximum=2),
    Option("COUNT", 3, "a count", minimum=1),
    Option("SUB.FLAG", True, "a flag in a sub-node"),
    removed={"OLD": "use WEIGHT 0 instead."},
)


def test_defaults_are_nested_and_validate_accepts_them():
    defaults = TABLE.defaults()
    assert defaults == {"MODE": "a", "WEIGHT": 1.0, "COUNT": 3, "SUB": {"FLAG": True}}
    TABLE.validate(defaults, "TRAINER.X")


@pytest.mark.parametrize("key, value, sentence", [
    ("MODE", "c", "TRAINER.X.MODE must be one of ('a', 'b'), got 'c'"),
    ("WEIGHT", -0.5, "TRAINER.X.WEIGHT must be >= 0, got -0.5"),
    ("WEIGHT", 2.5, "TRAINER.X.WEIGHT must be <= 2, got 2.5"),
    ("COUNT", 0, "TRAINER.X.COUNT must be >= 1, got 0"),
    ("COUNT", "3", "TRAINER.X.COUNT must be a int (a count), got '3'"),
    ("COUNT", True, "TRAINER.X.COUNT must be a int (a count), got True"),
])
def test_a_bad_value_is_one_sentence(key, value, sentence):
    node = {**TABLE.defaults(), key: value}
    with pytest.raises(ValueError) as err:
        TABLE.validate(node, "TRAINER.X")
    assert str(err.value) == sentence


def test_an_int_is_a_float_and_a_removed_key_is_named():
    TABLE.validate({**TABLE.defaults(), "WEIGHT": 1}, "TRAINER.X")
    with pytest.raises(ValueError, match=r"^TRAINER.X.OLD was removed: use WEIGHT 0 instead\.$"):
        TABLE.validate({**TABLE.defaults(), "OLD": True}, "TRAINER.X")
    with pytest.raises(ValueError, match="declared twice"):
        Options(Option("A", 1, "x"), Option("A", 2, "y"))


def test_a_later_table_replaces_keys_of_an_earlier_one():
    merged = Options(Option("PREC", "auto", "p"), Option("A", 1, "a")) + Options(Option("PREC", "amp", "q"))
    assert merged.defaults() == {"PREC": "amp", "A": 1}


def test_every_trainer_node_is_built_from_its_declaration():
    cfg = get_cfg_default()
    extend_cfg(cfg)
    for name in TRAINER_REGISTRY.registered_names():
        cls = TRAINER_REGISTRY.get(name)
        options = cls.all_options()
        assert all(o.help for o in options), name  # every key has a help text
        node = cfg.TRAINER[cls.cfg_node_name()]
        declared = {o.key for o in options}
        present = {f"{k}.{kk}" if isinstance(v, dict) else k for k, v in node.items()
                   for kk in (v.keys() if isinstance(v, dict) else [None])}
        assert present == declared, name
        options.validate(node, f"TRAINER.{cls.cfg_node_name()}")


def test_restore_use_fs_loss_was_removed_with_a_sentence(tmp_path):
    cfg = get_cfg_default()
    extend_cfg(cfg)
    with pytest.raises(ConfigError, match=r"^TRAINER.RESTORE.USE_FS_LOSS was removed: FS_WEIGHT alone switches "
                                          r".*\(from the command line\)\.$"):
        merge_opts(cfg, ["TRAINER.RESTORE.USE_FS_LOSS", "False"])
    old = tmp_path / "old.yaml"
    old.write_text("TRAINER:\n  RESTORE:\n    USE_FS_LOSS: False\n")
    with pytest.raises(ConfigError, match=r"^TRAINER.RESTORE.USE_FS_LOSS was removed: .*FS_WEIGHT 0.0 turns it off"):
        merge_file(cfg, str(old))
    assert cfg.TRAINER.RESTORE.FS_WEIGHT == 1.0  # nothing merged


def test_restore_bad_choice_is_refused_by_check_cfg():
    from trainers.restore_trainer import RESTORE

    cfg = get_cfg_default()
    extend_cfg(cfg)
    cfg.TRAINER.RESTORE.SHIFT = "gram"
    with pytest.raises(ValueError, match=r"^TRAINER.RESTORE.SHIFT must be one of \('prompt', 'feature'\), got 'gram'"):
        RESTORE.all_options().validate(cfg.TRAINER.RESTORE, "TRAINER.RESTORE")


def test_help_cli(capsys):
    assert main(["RESTORE"]) == 0
    out = capsys.readouterr().out
    assert "TRAINER.RESTORE.FS_WEIGHT (float, default 1.0): lambda of the feature-shift consistency loss" in out
    assert "TRAINER.RESTORE.PROMPTSRC.USE_GPA (bool, default True)" in out
    assert "TRAINER.RESTORE.USE_FS_LOSS: removed." in out
    assert main(["NoSuchTrainer"]) == 2
    assert "No trainer named 'NoSuchTrainer'; registered:" in capsys.readouterr().err
