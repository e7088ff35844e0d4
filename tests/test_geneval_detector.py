"""Mask2Former detector: mmdet-style post-processing on hand-made logits and on a tiny random model."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rewards.geneval.mask2former import (
    COCO_CLASSES, Mask2FormerDetector, PostprocessConfig, instance_postprocess, mask2bbox, postprocess,
    preprocess, rescale_size, upsample_masks,
)
from shared_data import geneval_dir

SHARED = geneval_dir()


def test_class_names_are_the_official_ones():
    names = [l.strip() for l in (SHARED / "object_names.txt").read_text().splitlines() if l.strip()]
    assert COCO_CLASSES == names and len(names) == 80


def _hand_logits():
    ln = math.log
    # softmax rows: q0 -> [0.6, 0.1, 0.1 | 0.2], q1 -> [0.1, 0.7, 0.1 | 0.1], q2 -> [0.1, 0.1, 0.1 | 0.7]
    cls = torch.tensor([[ln(6), 0.0, 0.0, ln(2)], [0.0, ln(7), 0.0, 0.0], [0.0, 0.0, 0.0, ln(7)]])
    masks = torch.full((3, 4, 5), -5.0)
    masks[0, 1:3, 1:4] = ln(3)      # sigmoid 0.75 on rows 1-2, cols 1-3
    masks[1, 3, 4] = ln(9)          # sigmoid 0.9 at (row 3, col 4)
    masks[1, 0, 0] = 0.0            # logit exactly 0 is outside the mask
    return cls, masks


def test_instance_postprocess_by_hand():
    cls, masks = _hand_logits()
    labels, boxes, scores, binary = instance_postprocess(cls, masks, max_per_image=2)
    # top-2 of the 9 softmax scores: (q1, class 1) = 0.7, (q0, class 0) = 0.6
    assert labels.tolist() == [1, 0]
    assert boxes.tolist() == [[4.0, 3.0, 5.0, 4.0], [1.0, 1.0, 4.0, 3.0]]   # mask2bbox: +1 on the far edge
    assert scores[0].item() == pytest.approx(0.7 * 0.9, abs=1e-6)
    assert scores[1].item() == pytest.approx(0.6 * 0.75 * 6 / (6 + 1e-6), abs=1e-7)
    expected0 = np.zeros((4, 5), bool)
    expected0[3, 4] = True
    assert np.array_equal(binary[0].numpy(), expected0)
    assert binary[1].sum().item() == 6


def test_postprocess_groups_by_class_and_drops_no_object():
    cls, masks = _hand_logits()
    dets = postprocess(cls, masks, (4, 5), classnames=["a", "b", "c"], config=PostprocessConfig(max_per_image=9))
    # all 9 (query, class) pairs are kept; the no-object column never is
    assert sum(len(v) for v in dets.values()) == 9
    assert set(dets) == {"a", "b", "c"}
    b = dets["b"]
    assert [d.box for d in b][0] == (4.0, 3.0, 5.0, 4.0) and b[0].score == pytest.approx(0.63, abs=1e-6)
    # q2 has an empty mask: box all zeros, score 0 (mask score 0 / 1e-6)
    assert any(d.box == (0.0, 0.0, 0.0, 0.0) and d.score == 0.0 for d in dets["c"])
    # within a class, highest score first
    for v in dets.values():
        assert [d.score for d in v] == sorted((d.score for d in v), reverse=True)
    assert b[0].mask.dtype == bool and b[0].mask.shape == (4, 5)


def test_bilinear_upsampling_and_strict_threshold_by_hand():
    # 2x2 -> 4x4 with align_corners=False: columns sample x = -0.25(clamped 0), 0.25, 0.75, 1.25(clamped 1)
    logits = torch.tensor([[[-1.0, 3.0], [-1.0, 3.0]]])
    up = upsample_masks(logits, (4, 4), (4, 4), (4, 4))
    assert up[0, 0].tolist() == pytest.approx([-1.0, 0.0, 2.0, 3.0])
    cls = torch.tensor([[0.0, -100.0]])  # one class with score ~1
    dets = postprocess(cls, logits, (4, 4), input_size=(4, 4), classnames=["x"])
    d = dets["x"][0]
    assert d.box == (2.0, 0.0, 4.0, 4.0)  # column 1 (logit exactly 0) is outside
    s = 1 / (1 + math.exp(-2)) * 0.5 + 1 / (1 + math.exp(-3)) * 0.5
    assert d.score == pytest.approx(s, rel=1e-5)


def test_upsample_crops_padding_before_resizing_to_original():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 8)
    # input padded to 24x32, the resized image occupies 20x28 of it, original is 10x14
    got = upsample_masks(logits, (24, 32), (20, 28), (10, 14))
    step1 = F.interpolate(logits[:, None], size=(24, 32), mode="bilinear", align_corners=False)[:, :, :20, :28]
    want = F.interpolate(step1, size=(10, 14), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(got, want)


def test_mask2bbox_convention():
    m = torch.zeros(2, 5, 6, dtype=torch.bool)
    m[0, 2, 3] = True
    assert mask2bbox(m).tolist() == [[3.0, 2.0, 4.0, 3.0], [0.0, 0.0, 0.0, 0.0]]


def test_rescale_and_pad_like_mmdet():
    assert rescale_size(512, 512) == (800, 800)
    assert rescale_size(640, 480) == (1067, 800)
    assert rescale_size(2000, 500) == (1333, 333)
    imgs = [Image.new("RGB", (40, 30), (124, 116, 104)), Image.new("RGB", (30, 30))]
    pix, sizes = preprocess(imgs, PostprocessConfig(scale=(70, 50)))
    # 40x30 -> factor min(70/40, 50/30) = 1.667 -> (67, 50); 30x30 -> factor 1.667 -> (50, 50)
    assert sizes == [(50, 67), (50, 50)]
    assert tuple(pix.shape) == (2, 3, 64, 96)
    assert abs(pix[0, 0, 0, 0].item() - (124 - 123.675) / 58.395) < 1e-5
    assert pix[1, :, :, 50:].abs().sum() == 0 and pix[0, :, 50:, :].abs().sum() == 0  # zero padding


def _tiny_model():
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    backbone = SwinConfig(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2, image_size=64,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                            encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                            dim_feedforward=32, num_queries=10, num_labels=80)
    torch.manual_seed(0)
    return Mask2FormerForUniversalSegmentation(cfg).eval()


def test_tiny_random_mask2former_through_from_pretrained(tmp_path):
    _tiny_model().save_pretrained(tmp_path / "m2f")
    det = Mask2FormerDetector(str(tmp_path / "m2f"), batch_size=2, config=PostprocessConfig(scale=(96, 64)))
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (48, 72, 3), dtype=np.uint8)) for _ in range(3)]
    out = det(imgs)
    assert len(out) == 3
    cls_logits, mask_logits, input_size, sizes = det.forward_logits(imgs[:1])
    assert cls_logits.shape == (1, 10, 81) and input_size == (64, 96) and sizes == [(64, 96)]
    assert mask_logits.shape[-2:] == (16, 24)  # 1/4 of the padded input
    again = postprocess(cls_logits[0], mask_logits[0], (48, 72), input_size=input_size, valid_size=sizes[0])
    for dets in (out[0], again):
        assert sum(len(v) for v in dets.values()) == 100  # top-100 of 10 queries x 80 classes
        assert set(dets) <= set(COCO_CLASSES)
    assert {k: [(d.box, round(d.score, 6)) for d in v] for k, v in out[0].items()} == \
           {k: [(d.box, round(d.score, 6)) for d in v] for k, v in again.items()}
    probs = torch.softmax(cls_logits[0], -1)[:, :-1].max().item()
    for v in out[0].values():
        for d in v:
            assert d.mask.shape == (48, 72) and 0.0 <= d.score <= probs + 1e-6
            if d.mask.any():
                ys, xs = np.nonzero(d.mask)
                assert d.box == (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            else:
                assert d.box == (0.0, 0.0, 0.0, 0.0)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="cannot load Mask2Former"):
        Mask2FormerDetector(str(tmp_path / "nope"))([Image.new("RGB", (8, 8))])


# --- CLIP colour classifier ---------------------------------------------------------------------

from rewards.geneval.color import ClipColorClassifier, object_crop, templates_for  # noqa: E402
from rewards.geneval.detection import Detection  # noqa: E402
from rewards.geneval.rules import COLORS, evaluate  # noqa: E402


def test_official_templates():
    assert [t.format(c="red") for t in templates_for("fire hydrant")] == [
        "a photo of a red fire hydrant", "a photo of a red-colored fire hydrant", "a photo of a red object"]


def test_object_crop_composites_on_999_through_the_mask():
    img = Image.new("RGB", (20, 10), (0, 0, 255))
    mask = np.zeros((10, 20), bool)
    mask[2:5, 3:7] = True
    d = Detection("cup", (3.0, 2.0, 8.0, 6.0), 0.9, mask=mask)   # box one pixel wider/taller than the mask
    crop = np.asarray(object_crop(img, d))
    assert crop.shape == (4, 5, 3)
    assert (crop[:3, :4] == (0, 0, 255)).all()
    assert (crop[3, :] == 153).all() and (crop[:, 4] == 153).all()
    assert np.asarray(object_crop(img, Detection("cup", (3.0, 2.0, 8.0, 6.0), 0.9))).tolist() == \
        np.asarray(img.crop((3, 2, 8, 6))).tolist()
    with pytest.raises(ValueError, match="mask shape"):
        object_crop(img, Detection("cup", (0, 0, 1, 1), 0.9, mask=np.zeros((3, 3), bool)))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import json

    import open_clip

    d = tmp_path_factory.mktemp("clip")
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (d / "geneval-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(d / "geneval-tiny-clip.json"))
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("geneval-tiny-clip", pretrained=None)
    torch.save(model.state_dict(), d / "weights.pt")
    # the real loading path: model name + a local weights file
    return ClipColorClassifier("geneval-tiny-clip", pretrained=str(d / "weights.pt"), batch_size=2)


def test_clip_head_is_the_clip_benchmark_zero_shot_classifier(tiny_clip):
    head = tiny_clip.head("car")
    assert head.shape == (16, 10) and torch.allclose(head.norm(dim=0), torch.ones(10), atol=1e-5)
    assert tiny_clip.head("car") is head
    m, tok = tiny_clip._model, tiny_clip._tokenizer
    with torch.no_grad():
        e = F.normalize(m.encode_text(tok(["a photo of a blue car", "a photo of a blue-colored car",
                                          "a photo of a blue object"])), dim=-1).mean(0)
    assert torch.allclose(head[:, COLORS.index("blue")], e / e.norm(), atol=1e-6)


def test_clip_colour_matches_manual_pipeline_and_feeds_the_rules(tiny_clip):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    masks = [np.zeros((40, 60), bool) for _ in range(3)]
    masks[0][5:20, 5:30] = True
    masks[1][10:40, 30:60] = True
    masks[2][0:8, 0:8] = True
    dets = [Detection("car", (5.0, 5.0, 30.0, 20.0), 0.9, mask=masks[0]),
            Detection("car", (30.0, 10.0, 60.0, 40.0), 0.8, mask=masks[1]),
            Detection("car", (0.0, 0.0, 8.0, 8.0), 0.7, mask=masks[2])]
    logits = tiny_clip.logits(img, dets)
    with torch.no_grad():
        batch = torch.stack([tiny_clip._transform(object_crop(img, d)) for d in dets])
        want = 100.0 * F.normalize(tiny_clip._model.encode_image(batch), dim=-1) @ tiny_clip.head("car")
    assert torch.allclose(logits, want, atol=1e-4)
    colors = tiny_clip.classify_many(img, dets)
    assert colors == [tiny_clip(img, d) for d in dets] and set(colors) <= set(COLORS)
    meta = {"tag": "colors", "include": [{"class": "car", "count": 2, "color": colors[0]}]}
    r = evaluate({"car": dets}, meta, image=img, color_fn=tiny_clip)
    assert r.correct == (colors[:2].count(colors[0]) >= 2)


def test_clip_load_failure_is_clear():
    with pytest.raises(RuntimeError, match="cannot load CLIP"):
        ClipColorClassifier("no-such-model", pretrained=None).head("car")


def test_postprocess_upsamples_only_needed_queries_but_matches_full():
    torch.manual_seed(3)
    cls = torch.randn(12, 6) * 3
    masks = torch.randn(12, 5, 7)
    cfg = PostprocessConfig(max_per_image=7)
    got = postprocess(cls, masks, (10, 14), input_size=(20, 28), valid_size=(18, 24), classnames=list("abcde"), config=cfg)
    full = upsample_masks(masks, (20, 28), (18, 24), (10, 14))
    labels, boxes, scores, binary = instance_postprocess(cls, full, max_per_image=7)
    assert sum(len(v) for v in got.values()) == 7
    flat = sorted((d.label, d.box, round(d.score, 6)) for v in got.values() for d in v)
    want = sorted(("abcde"[int(l)], tuple(b.tolist()), round(float(s), 6)) for l, b, s in zip(labels, boxes, scores))
    assert flat == want
