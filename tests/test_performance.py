"""The exact speed-ups are exact (truncated text tower, cached evaluation text) and the benchmark runs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import token_ids

from restore.benchmark import main as benchmark_main
from restore.benchmark import LiveTensorMemory, eval_cache_flop_ratio, speedups, synthetic_classnames
from restore.clip.model import TINY_CONFIG
from restore.prompting.encoders import DeepTokens, PromptedTextEncoder


def _deep_groups(width: int, kind: str) -> list[DeepTokens]:
    g = torch.Generator().manual_seed(5)
    if kind == "maple":  # replace positions 1..2 from layer 1 to 8
        return [DeepTokens([torch.randn(2, width, generator=g) for _ in range(8)], first_layer=1, position=1,
                           insert=False, name="text_prompts")]
    if kind == "mmrl":  # insert 5 tokens after BOT at layer 6, replaced at every later layer
        return [DeepTokens([torch.randn(5, width, generator=g) for _ in range(6)], first_layer=6, position=1,
                           insert=True, name="rep")]
    # both at once, plus a per-sample (B, n, D) group
    return _deep_groups(width, "maple") + _deep_groups(width, "mmrl")


@pytest.mark.parametrize("kind", ["none", "maple", "mmrl", "both"])
@torch.no_grad()
def test_truncated_text_tower_equals_full_one_with_deep_prompts(tiny_clip, kind):
    encoder = PromptedTextEncoder(tiny_clip)
    ids = token_ids([4, 19, 9, 12])
    embeddings = encoder.embed(ids)
    # learned layer-0 context as CoOp/MaPLe put it into the embeddings (positions 1..4)
    embeddings[:, 1:5] = torch.randn(4, 4, encoder.width, generator=torch.Generator().manual_seed(1))
    deep = [] if kind == "none" else _deep_groups(encoder.width, kind)
    fast = encoder(embeddings, ids.argmax(-1), deep)
    full = encoder(embeddings, ids.argmax(-1), deep, truncate=False)
    assert fast.tokens.shape[1] < full.tokens.shape[1]
    assert torch.equal(fast.pooled_index, full.pooled_index)
    assert fast.slots == full.slots
    assert torch.allclose(fast.features, full.features, atol=2e-5, rtol=1e-5)
    # the speedups(truncate=False) switch reaches every encoder call
    with speedups(truncate=False):
        switched = encoder(embeddings, ids.argmax(-1), deep, return_hidden=True)
    assert switched.hidden_states[0].shape[1] == 77
    assert torch.allclose(switched.features, full.features, atol=1e-6)


@torch.no_grad()
def test_truncated_text_tower_gradients_match(tiny_clip):
    encoder = PromptedTextEncoder(tiny_clip)
    ids = token_ids([6, 11])
    grads = []
    for truncate in (True, False):
        ctx = torch.randn(2, 2, encoder.width, generator=torch.Generator().manual_seed(3)).requires_grad_()
        deep = _deep_groups(encoder.width, "both")
        with torch.enable_grad():
            emb = torch.cat([encoder.embed(ids)[:, :1], ctx, encoder.embed(ids)[:, 3:]], dim=1)
            encoder(emb, ids.argmax(-1), deep, truncate=truncate).features.pow(2).sum().backward()
        grads.append(ctx.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def _coop(tiny_clip, classnames):
    from trainers.coop import CoOpModel

    node = SimpleNamespace(N_CTX=4, CTX_INIT="", CSC=False, CLASS_TOKEN_POSITION="end")
    torch.manual_seed(0)
    return CoOpModel(tiny_clip, classnames, node).eval()


@torch.no_grad()
def test_cached_evaluation_gives_the_per_batch_logits(tiny_clip):
    model = _coop(tiny_clip, synthetic_classnames(7))
    images = [torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    per_batch = [model(x).logits for x in images]
    calls = []
    original = model.encode_text
    model.encode_text = lambda: calls.append(1) or original()  # type: ignore[method-assign]
    with model.inference_cache():
        cached = [model(x).logits for x in images]
    assert len(calls) == 1  # text features computed once for the whole evaluation
    for a, b in zip(per_batch, cached):
        assert torch.allclose(a, b, atol=1e-6)
    assert model._cached_text is None  # cache dropped after the evaluation
    calls.clear()
    with speedups(cache=False), model.inference_cache():
        plain = [model(x).logits for x in images]
    assert len(calls) == 3  # the switch restores per-batch text features
    for a, b in zip(per_batch, plain):
        assert torch.allclose(a, b, atol=1e-6)


def test_synthetic_classnames_have_realistic_lengths():
    from restore.clip.tokenizer import encode

    names = synthetic_classnames(1000)
    assert len(set(names)) == 1000
    lengths = [len(encode(n)) for n in names]
    assert min(lengths) >= 1 and 4 <= max(lengths) <= 12 and 1.5 <= sum(lengths) / len(lengths) <= 5


def test_benchmark_smoke_writes_keys_and_positive_ratios(tmp_path, capsys):
    threads = torch.get_num_threads()
    js, md = tmp_path / "bench.json", tmp_path / "bench.md"
    try:
        rc = benchmark_main(["--tiny", "--device", "cpu", "--trainers", "CoOp", "MaPLe", "RESTORE",
                             "--json", str(js), "--md", str(md)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    report = json.loads(js.read_text())
    for key in ("text_speedup_1000", "eval_speedup_1000", "restore_vs_maple_step", "restore_feature_mode_overhead"):
        assert isinstance(report[key], float) and report[key] > 0, (key, report[key], report["notes"])
    assert "precision_speedup_train_1000" in report
    for name in ("CoOp", "MaPLe", "RESTORE"):
        for classes in ("5", "12"):
            row = report["results"][name][classes]
            assert "error" not in row, row
            assert row["train_ms_per_image"] > 0 and row["eval_images_per_s"] > 0
            assert row["train_speedup"] > 0 and row["eval_speedup"] > 0
            # CPU estimate in bf16: the truncated text tower needs less memory than the full one
            assert 0 < row["peak_memory_mib"] < row["peak_memory_mib_plain"], row
    assert report["eval_cache_flop_ratio_1000"] == eval_cache_flop_ratio(TINY_CONFIG, 4, 12)
    text = md.read_text()
    assert "| CoOp | 12 |" in text and "text_speedup_1000" in text
    assert "text_speedup_1000" in capsys.readouterr().out


def test_live_tensor_memory_counts_storages_once_and_releases_them():
    existing = torch.zeros(250)  # 1000 bytes alive before the block
    with LiveTensorMemory([existing, existing[:10]]) as tracker:
        assert tracker.current == 1000
        a = torch.ones(1000)  # 4000
        b = torch.ones(2000, dtype=torch.float64)  # 16000
        view = b[:10]
        b.add_(1)  # in place: same storage
        assert tracker.current == 21000
        del a
        c = torch.ones(500, dtype=torch.bfloat16)  # 1000
    assert tracker.peak == 21000 and tracker.current == 18000
    del b, view, c


def test_live_tensor_memory_sees_gradients_and_saved_activations():
    weight = torch.zeros(300, 200, requires_grad=True)  # 240,000 bytes
    x = torch.ones(50, 200)  # 40,000 bytes
    with LiveTensorMemory([weight, x]) as tracker:
        y = x @ weight.t()  # 60,000; x is saved for backward (already counted)
        y.sum().backward()  # weight.grad 240,000; grad_y is an expanded scalar (4 bytes)
    assert weight.grad is not None
    assert 240_000 + 40_000 + 60_000 + 240_000 <= tracker.peak <= 240_000 + 40_000 + 60_000 + 240_000 + 64


def test_eval_cache_flop_ratio_matches_the_hand_count():
    c, batch, classes = TINY_CONFIG, 4, 12

    def layers(n_seq: int, length: int, width: int, depth: int) -> int:
        # per layer: qkv 6NW^2 + out 2NW^2 + MLP 16NW^2 (N = n_seq * length) + attention 4 n_seq L^2 W
        return depth * (24 * n_seq * length * width**2 + 4 * n_seq * length**2 * width)

    grid = c.image_resolution // c.vision_patch_size
    image = (2 * batch * grid**2 * c.vision_width * 3 * c.vision_patch_size**2
             + layers(batch, grid**2 + 1, c.vision_width, c.vision_layers) + 2 * batch * c.vision_width * c.embed_dim)
    text = (layers(classes, c.context_length, c.transformer_width, c.transformer_layers)
            + 2 * classes * c.transformer_width * c.embed_dim)
    assert eval_cache_flop_ratio(c, batch, classes) == round((image + text) / image, 3)


def test_benchmark_reports_progress_after_every_row():
    from restore.benchmark import run_benchmark

    snapshots: list[list[tuple[str, str]]] = []
    report = run_benchmark(torch.device("cpu"), tiny=True, trainers=["ZeroshotCLIP", "CoOp"], memory=False,
                           log=lambda line: None, reps=1, class_counts=[3, 6],
                           on_progress=lambda r: snapshots.append(
                               [(n, c) for n, rows in r["results"].items() for c in rows]))
    assert snapshots == [[("ZeroshotCLIP", "3")], [("ZeroshotCLIP", "3"), ("ZeroshotCLIP", "6")],
                         [("ZeroshotCLIP", "3"), ("ZeroshotCLIP", "6"), ("CoOp", "3")],
                         [("ZeroshotCLIP", "3"), ("ZeroshotCLIP", "6"), ("CoOp", "3"), ("CoOp", "6")]]
    assert report["num_classes"] == [3, 6] and "train_ms_per_image" not in report["results"]["ZeroshotCLIP"]["6"]
    assert report["results"]["CoOp"]["6"]["peak_memory_mib"] is None  # memory=False on CPU


def test_bench_trainer_emulates_the_gpu_working_precision_on_cpu(tiny_clip):
    import trainers  # noqa: F401
    from restore.benchmark import _batch, _train_step, build_bench_trainer

    names = synthetic_classnames(5)
    fp32 = build_bench_trainer("CoOp", tiny_clip, names, torch.device("cpu"), "auto")
    bf16 = build_bench_trainer("CoOp", tiny_clip, names, torch.device("cpu"), "bf16")
    assert fp32.autocast_dtype is None and next(fp32.model.clip.parameters()).dtype == torch.float32
    assert bf16.autocast_dtype == torch.bfloat16 and bf16.precision == "bf16"
    assert {p.dtype for n, p in bf16.model.clip.named_parameters() if n != "logit_scale"} == {torch.bfloat16}
    # logit_scale stays fp32: CLIP's log(100) in bf16 would give a scale of 98.9
    assert bf16.model.clip.logit_scale.dtype == torch.float32
    assert bf16.model.logit_scale.item() == pytest.approx(float(bf16.model.clip.logit_scale.detach().exp()), rel=1e-7)
    learnable = [p for p in bf16.model.parameters() if p.requires_grad]
    assert learnable and all(p.dtype == torch.float32 for p in learnable)
    before = [p.detach().clone() for p in learnable]
    bf16.set_model_mode("train")
    _train_step(bf16, _batch(2, 5, tiny_clip.visual.input_resolution, torch.device("cpu")))()
    assert all(p.dtype == torch.float32 and not torch.equal(p, b) for p, b in zip(learnable, before))
