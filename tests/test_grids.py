"""Grids a person can read (issue 16): one row per prompt group, wrapped captions, the reward on each tile."""
from PIL import Image

from fpo_diffusion.images import _font, grid_positions, group_rows, labelled_grid, make_grid, wrap_text


def test_wrap_text_keeps_every_word_and_breaks_between_words():
    font = _font(13)
    text = "a photo of a green circle left of a green square"
    lines = wrap_text(text, 120, font)
    assert len(lines) > 1 and " ".join(lines) == text  # nothing lost, no word cut ("gree / n")
    assert all(w in text.split() for line in lines for w in line.split())
    long = wrap_text("a supercalifragilisticexpialidociousword", 60, font)
    assert "".join(long).replace(" ", "") == "asupercalifragilisticexpialidociousword"  # a word wider than a line is cut
    short = wrap_text(" ".join(["word"] * 50), 80, font, max_lines=2)
    assert len(short) == 2 and short[-1].endswith("\u2026")



def test_a_word_of_100000_characters_is_measured_in_linear_work_and_truncated(monkeypatch):
    """Issue 24: the caption wrapper was cubic in the length of a word without spaces (a URL, base64, CJK:
    100 000 characters never finished). Every character measured is counted; the work must stay linear."""
    from PIL import ImageDraw

    measured = [0]
    real = ImageDraw.ImageDraw.textlength

    def counting(self, text, *a, **k):
        measured[0] += len(text)
        if measured[0] > budget:
            raise AssertionError(f"measured {measured[0]} characters for a {n}-character caption")
        return real(self, text, *a, **k)

    monkeypatch.setattr(ImageDraw.ImageDraw, "textlength", counting)
    font = _font(13)
    for n, text in ((100_000, "x" * 100_000), (100_000, "\u732b" * 100_000),
                    (100_003, "a " + "https://example.com/" + "Zm9v" * 24_995)):
        budget = 40 * n
        measured[0] = 0
        lines = wrap_text(text, 212, font, max_lines=8)
        assert len(lines) == 8 and lines[-1].endswith("\u2026")  # truncated to what fits
        measured[0] = 0
        whole = wrap_text(text, 212, font)  # no line limit: every character kept, still linear work
        assert "".join(whole).replace(" ", "") == text.replace(" ", "")
    measured[0], budget, n = 0, 40 * 300_000, 300_000
    grid = labelled_grid([[Image.new("RGB", (64, 64))]], ["y" * 100_000], [["0.50"]], title="z" * 100_000,
                         tile_captions=[["w" * 100_000]])
    assert grid.size[0] > 0

def test_grid_positions_show_every_group():
    keys = [g for g in range(8) for _ in range(8)]  # the default iteration: 8 prompts x 8 samples
    pos = grid_positions(keys, 16)
    assert sorted({keys[i] for i in pos}) == list(range(8)) and len(pos) == 16  # 2 of each prompt
    assert group_rows([keys[i] for i in pos]) == [[2 * g, 2 * g + 1] for g in range(8)]
    assert grid_positions([5, 5, 3, 3], 16) == [0, 1, 2, 3] and grid_positions([], 4) == []


def test_labelled_grid_layout():
    tiles = [[Image.new("RGB", (32, 32), (40 * r, 0, 0)) for _ in range(n)] for r, n in enumerate([3, 1])]
    g = labelled_grid(tiles, ["a prompt", "another prompt"], [["0.50", "1.00", "-0.50"], ["0.25"]], min_side=64,
                      caption_width=100, pad=4)
    lab = 13 + 2  # the labels' strip above each row of tiles (font size + 2)
    assert g.size == (4 + 100 + 3 * (64 + 4), 4 + 2 * (lab + 64 + 4))
    row2 = 4 + lab + 64 + 4 + lab
    assert g.getpixel((4 + 100 + 32, 4 + lab + 40)) == (0, 0, 0) and g.getpixel((4 + 100 + 32, row2 + 40)) == (40, 0, 0)
    assert g.getpixel((4 + 100 + 68 + 32, row2 + 40)) == (255, 255, 255)  # row 2 holds one tile
    # the labels never cover the image: every pixel of every tile is its image's, the top-left corner included
    for r, n in enumerate([3, 1]):
        for c in range(n):
            x0, y0 = 4 + 100 + c * 68, 4 + lab + r * (lab + 64 + 4)
            tile = g.crop((x0, y0, x0 + 64, y0 + 64))
            assert tile.getcolors() == [(64 * 64, (40 * r, 0, 0))], (r, c)
    plain = make_grid([Image.new("RGB", (16, 16))] * 5, ["x"] * 5, cols=4)
    assert plain.size[0] == 4 + 4 * (128 + 4)


def test_training_grid_has_a_row_per_prompt(tmp_path):
    from fpo_diffusion.config_io import load_config
    from fpo_diffusion.trainer import Trainer

    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "model.family=sd3", "model.path=embedded:tiny-sd3",
                             "prompts.source=embedded:tiny", "reward.weights={brightness: 1.0}", "sampling.steps=2",
                             "train.prompts_per_iteration=4", "train.group_size=4", "log.grid_images=8",
                             "log.tensorboard=false", "log.progress=false"])
    tr = Trainer(cfg)
    ro = tr.rollout(0)
    assert len(ro.images) == 8 and len({int(ro.prompt_idx[i]) for i in ro.image_index}) == 4  # every prompt, 2 each
    import numpy as np
    import torch

    from fpo_diffusion.images import to_pil

    with torch.no_grad():  # each tile is the sample its position names
        again = to_pil(tr.policy.decode(ro.x0[ro.image_index]))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again, ro.images))
    grid = tr._samples_grid(ro, 0)
    h = next(iter(ro.images)).size[1] * max(1, -(-128 // next(iter(ro.images)).size[1]))
    assert grid.size[1] >= 4 * h  # four rows
