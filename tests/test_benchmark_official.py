"""python -m restore.benchmark --official DIR: agreement check, refusal, report; on fake official checkouts
written here (CI has no official code). The fake "official" CoOp is our CoOp trainer whose learned context
is registered the official way (``prompt_learner`` holding ``ctx`` and the class buffers), loading CLIP
through the checkout's own ``clip._download`` (which the shims must point at the weights file)."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest
import torch

import trainers  # noqa: F401  registers the trainers
from restore import benchmark
from restore.benchmark_official import (
    DisagreementError,
    official_cfg,
    official_trainer_class,
)

FAKE_TRAINER = '''
import torch
from torch import nn

from clip import clip
from dassl.engine import TRAINER_REGISTRY
from restore.clip.loader import load_clip
from trainers.coop import CoOp as Ours

WRONG = {wrong}


@TRAINER_REGISTRY.register()
class CoOp(Ours):
    def load_backbone(self):
        return load_clip(clip._download("https://example.invalid/ViT.pt")).model

    def build_model(self):
        super().build_model()
        holder = nn.Module()  # the official layout: prompt_learner.{{ctx, token_prefix, token_suffix}}
        ctx = self.model.prompt_learner.ctx
        # WRONG: the tensor registered as ctx is not the one the model computes with
        holder.ctx = nn.Parameter(torch.randn_like(ctx)) if WRONG else ctx
        holder.register_buffer("token_prefix", torch.zeros(1))
        holder.register_buffer("token_suffix", torch.zeros(1))
        self.register_model("official_layout", holder, None, None)
'''


def fake_checkout(root, wrong: bool):
    (root / "clip").mkdir(parents=True)
    (root / "clip" / "__init__.py").write_text("")
    (root / "clip" / "clip.py").write_text("def _download(url, root=None):\n    raise RuntimeError('no network')\n")
    (root / "trainers").mkdir()
    (root / "trainers" / "__init__.py").write_text("")
    (root / "trainers" / "coop.py").write_text(FAKE_TRAINER.format(wrong=wrong))
    (root / "configs").mkdir()
    (root / "configs" / "coop.yaml").write_text("TRAINER:\n  COOP:\n    N_CTX: 16\n")
    (root / "train.py").write_text(textwrap.dedent('''
        import sys
        raise SystemExit("the benchmark must not run train.py")  # only extend_cfg is read


        def extend_cfg(cfg):
            from restore.engine.config import extend_cfg as ours
            ours(cfg)
            cfg.TRAINER.COOP.PREC = "fp16"
        '''))
    return root


@pytest.fixture(autouse=True)
def coop_official(monkeypatch):
    from restore.official import OfficialRun

    run = OfficialRun(repo="fake/CoOp", trainer="CoOp", config="configs/coop.yaml", ours="CoOp", our_config="")
    monkeypatch.setattr(sys.modules["trainers.coop"], "OFFICIAL", run, raising=False)
    half = torch.Tensor.half
    yield
    assert torch.Tensor.half is half  # the shims are removed after the run
    assert "clip" not in sys.modules or not str(getattr(sys.modules["clip"], "__file__", "")).startswith("/tmp")


def test_agreeing_models_are_timed_side_by_side(tmp_path, capsys):
    checkout = fake_checkout(tmp_path / "CoOp", wrong=False)
    out = tmp_path / "out"
    code = benchmark.main(["--official", str(checkout), "--tiny", "--device", "cpu", "--trainers", "CoOp",
                           "--classes", "3", "5", "--reps", "1", "--mha", "--json", str(out / "r.json"), "--md", str(out / "r.md")])
    assert code == 0
    report = json.loads((out / "r.json").read_text())
    assert report["mode"] == "official" and report["precision"] == "fp32"
    for classes in ("3", "5"):
        row = report["results"]["CoOp"][classes]
        agreement = row["agreement"]
        assert agreement["ok"] and agreement["loss_rel_diff"] < 1e-5 and agreement["logits_rel_diff"] < 1e-5
        assert agreement["grads_rel_diff"] < 1e-4
        assert row["learned_tensors_copied"] == 1
        ms = row["train_ms_per_image"]
        assert ms["official"]["min"] <= ms["official"]["median"] <= ms["official"]["max"]
        assert row["train_speedup"] == pytest.approx(ms["official"]["median"] / ms["ours"]["median"], rel=1e-2)
        ips = row["eval_images_per_s"]
        assert row["eval_speedup"] == pytest.approx(ips["ours"]["median"] / ips["official"]["median"], rel=1e-2)
        assert row["peak_memory_mib"]["official"] > 0 and row["peak_memory_mib"]["ours"] > 0
        assert ("mha" in row) == (classes == "3")  # nn.MultiheadAttention timed at the first class count only
    mha = report["results"]["CoOp"]["3"]["mha"]
    ms = report["results"]["CoOp"]["3"]["train_ms_per_image"]
    assert mha["fused_vs_mha_train"] == pytest.approx(ms["ours_mha"]["median"] / ms["ours"]["median"], rel=1e-2)
    table = (out / "r.md").read_text()
    assert "| CoOp (CoOp) | 3 |" in table and "REFUSED" not in table and "fused / MHA train" in table


def test_disagreeing_models_are_refused_without_a_ratio(tmp_path, capsys):
    checkout = fake_checkout(tmp_path / "Wrong", wrong=True)
    out = tmp_path / "out"
    code = benchmark.main(["--official", str(checkout), "--tiny", "--device", "cpu", "--trainers", "CoOp",
                           "--classes", "3", "4", "--reps", "1", "--json", str(out / "r.json"), "--md", str(out / "r.md")])
    assert code == 3
    row = json.loads((out / "r.json").read_text())["results"]["CoOp"]["3"]
    assert set(row) == {"refused"}  # no timing, no ratio
    assert "disagree" in row["refused"] and "no speed ratio is reported" in row["refused"]
    table = (out / "r.md").read_text()
    assert "| CoOp | 3 | REFUSED:" in table
    assert "no speed ratio is reported. |" in table  # the whole reason, not cut mid-word


def test_one_class_count_given_twice_is_measured_once(tmp_path, capsys):
    checkout = fake_checkout(tmp_path / "Wrong", wrong=True)
    out = tmp_path / "r.json"
    assert benchmark.main(["--official", str(checkout), "--tiny", "--device", "cpu", "--trainers", "CoOp",
                           "--classes", "3", "3", "--reps", "1", "--json", str(out)]) == 3
    printed = capsys.readouterr()
    assert (printed.out + printed.err).count("3 classes: CoOp and the official CoOp disagree") == 1
    assert list(json.loads(out.read_text())["results"]["CoOp"]) == ["3"]


def test_agreement_check_raises_on_a_wrong_mapping(tmp_path):
    """compare_with_official itself raises DisagreementError (the report turns it into a refusal)."""
    from restore.benchmark_official import compare_with_official, official_session
    from restore.official import write_parity_clip

    checkout = fake_checkout(tmp_path / "Wrong2", wrong=True)
    weights = write_parity_clip(str(tmp_path / "clip.pt"), config=benchmark.TINY_CONFIG)
    preset = benchmark.make_preset(False, torch.device("cpu"), tiny=True)
    with official_session(str(checkout), weights, "fp32"), pytest.raises(DisagreementError, match="disagree"):
        compare_with_official(str(checkout), "CoOp", ["a", "b", "c"], weights, torch.device("cpu"), "fp32", preset,
                              benchmark.TINY_CONFIG.image_resolution)


def test_official_cfg_reads_extend_cfg_only_and_sets_every_prec(tmp_path):
    checkout = fake_checkout(tmp_path / "Cfg", wrong=False)
    cfg = official_cfg(str(checkout), "CoOp", "configs/coop.yaml", "fp32")
    assert cfg.TRAINER.NAME == "CoOp" and cfg.TRAINER.COOP.N_CTX == 16  # from the config file
    assert all(node.PREC == "fp32" for node in cfg.TRAINER.values() if hasattr(node, "PREC"))
    assert official_trainer_class(str(checkout), "NoSuchTrainer") is None


def test_bad_official_folder_is_one_sentence(tmp_path, capsys):
    assert benchmark.main(["--official", str(tmp_path / "missing"), "--tiny", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --official") and "\n" not in err and not math.isnan(len(err))


def test_mha_attention_switch_computes_the_same_and_changes_no_state(tiny_clip):
    """benchmark.mha_attention: the 'before' attention (nn.MultiheadAttention on the same parameters)."""
    model = tiny_clip.eval()
    keys = list(model.state_dict())
    images = torch.randn(2, 3, model.visual.input_resolution, model.visual.input_resolution)
    tokens = torch.randint(1, 100, (3, model.context_length))
    tokens[:, 5] = model.vocab_size - 1  # EOT (argmax) inside the causal mask's reach
    with torch.no_grad():
        fused = model.encode_image(images), model.encode_text(tokens)
        with benchmark.mha_attention():
            before = model.encode_image(images), model.encode_text(tokens)
        after = model.encode_image(images)
    for a, b in zip(fused, before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.equal(after, fused[0])  # switched back
    assert list(model.state_dict()) == keys


def test_restore_reads_maple_fsa_names(tiny_clip):
    """RESTORE's official_keys: MaPLe_FSA's adapters (post_ln, FFN.0, FFN.2) and calibration ratios."""
    from restore.engine.config import extend_cfg, get_cfg_default
    from trainers.restore_trainer import RestoreMaPLeModel

    cfg = get_cfg_default()
    extend_cfg(cfg)
    node = cfg.TRAINER.RESTORE
    node.PROMPT_DEPTH = 2
    model = RestoreMaPLeModel(tiny_clip, ["a", "b"], node)
    ours = model.checkpoint_state()
    official = {"prompt_learner.ctx": torch.randn_like(ours["prompt_learner.text_context.ctx"]),
                "prompt_learner.token_prefix": torch.zeros(2, 1, 4), "text_cali_ratio": torch.tensor(0.3),
                "vis_cali_ratio": torch.tensor(0.02)}
    for key, value in ours.items():
        if key.startswith("prompt_learner.") and "text_context" not in key:
            official[key] = torch.randn_like(value)
    for side in ("text", "visual"):
        for ours_name, theirs in (("ln", "post_ln"), ("up", "FFN.0"), ("down", "FFN.2")):
            for kind in ("weight", "bias"):
                official[f"{side}_adapter.{theirs}.{kind}"] = torch.randn_like(ours[f"restore.{side}_adapter.{ours_name}.{kind}"])
    model.load_checkpoint_state(official, "MaPLe_FSA")
    state = model.checkpoint_state()
    assert torch.equal(state["prompt_learner.text_context.ctx"], official["prompt_learner.ctx"])
    assert torch.equal(state["restore.visual_adapter.down.weight"], official["visual_adapter.FFN.2.weight"])
    assert torch.equal(state["restore.text_adapter.ln.bias"], official["text_adapter.post_ln.bias"])
    assert float(state["restore.text_ratio"]) == pytest.approx(0.3) and float(state["restore.vision_ratio"]) == pytest.approx(0.02)
    assert torch.equal(state["restore.fs_ref_text"], ours["restore.fs_ref_text"])  # not in MaPLe_FSA's state: kept
