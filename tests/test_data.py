"""CPU tests for data.py: toy oracle, readers, buckets, cache round trip."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from data import (TOY_BACKGROUNDS, TOY_COLORS, TOY_CORRUPTIONS, TOY_SHAPES,  # noqa: E402
                  corrupt_toy, parse_toy_prompt, render_toy, toy_annotate,
                  toy_golden_score, toy_prompt)


def _toy_set(n, seed=0):
    rng = np.random.default_rng(seed)
    cols, bgs = list(TOY_COLORS), list(TOY_BACKGROUNDS)
    attrs = [(cols[rng.integers(len(cols))], TOY_SHAPES[rng.integers(3)], bgs[rng.integers(len(bgs))])
             for _ in range(n)]
    return [render_toy(*a, rng) for a in attrs], attrs, rng


# ----------------------------------------------------------------------------- toy world
def test_prompt_roundtrip_and_errors():
    for c in TOY_COLORS:
        for s in TOY_SHAPES:
            for b in TOY_BACKGROUNDS:
                assert parse_toy_prompt(toy_prompt(c, s, b)) == (c, s, b)
    assert not set(TOY_COLORS.values()) & set(TOY_BACKGROUNDS.values())
    with pytest.raises(ValueError, match="a pink circle"):
        parse_toy_prompt("a pink circle on a white background")


def test_render_inside_frame_and_deterministic():
    imgs, attrs, _ = _toy_set(50)
    imgs2, _, _ = _toy_set(50)
    for im, im2, (c, s, b) in zip(imgs, imgs2, attrs):
        x = np.asarray(im)
        assert im.size == (32, 32) and np.array_equal(x, np.asarray(im2))
        assert (x[0] == TOY_BACKGROUNDS[b]).all() or (x[:, 0] == TOY_BACKGROUNDS[b]).any()
        area = (x == TOY_COLORS[c]).all(-1).sum()
        assert 0.4 ** 2 * 1024 * 0.45 <= area <= 0.75 ** 2 * 1024 + 1


def test_oracle_reads_clean_renders():
    imgs, attrs, _ = _toy_set(300)
    prompts = [toy_prompt(*a) for a in attrs]
    s = toy_golden_score(imgs, prompts)
    assert s.shape == (300,) and s.dtype.kind == "f"
    assert (s > 0.9).mean() > 0.95 and s.min() >= 0 and s.max() <= 1
    assert np.array_equal(s, toy_golden_score(imgs, prompts))  # deterministic
    # uint8 array and float (N,3,H,W) in [-1, 1] inputs give the same score
    u8 = np.stack([np.asarray(im) for im in imgs])
    f = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert np.allclose(toy_golden_score(u8, prompts), s)
    assert np.allclose(toy_golden_score(f, prompts), s, atol=1e-3)


def test_oracle_penalises_wrong_attributes():
    imgs, attrs, _ = _toy_set(200, seed=1)
    clean = toy_golden_score(imgs, [toy_prompt(*a) for a in attrs])
    cols, bgs = list(TOY_COLORS), list(TOY_BACKGROUNDS)
    for j in range(3):
        wrong = []
        for a in attrs:
            a = list(a)
            pool = [cols, TOY_SHAPES, bgs][j]
            a[j] = pool[(pool.index(a[j]) + 1) % len(pool)]
            wrong.append(toy_prompt(*a))
        w = toy_golden_score(imgs, wrong)
        assert (w < clean - 0.15).mean() > 0.95, j


def test_oracle_corruptions_monotone():
    imgs, attrs, rng = _toy_set(150, seed=2)
    prompts = [toy_prompt(*a) for a in attrs]
    clean = toy_golden_score(imgs, prompts).mean()
    for kind in TOY_CORRUPTIONS:
        means = [toy_golden_score([corrupt_toy(im, kind, st, rng) for im in imgs], prompts).mean()
                 for st in (0.25, 0.5, 0.75, 1.0)]
        assert clean - means[1] > 0.1, kind
        assert all(a > b for a, b in zip(means, means[1:])), (kind, means)


def test_oracle_speed_and_empty_image():
    import time
    imgs, attrs, _ = _toy_set(1000, seed=3)
    u8 = np.stack([np.asarray(im) for im in imgs])
    t = time.time()
    toy_golden_score(u8, [toy_prompt(*a) for a in attrs])
    assert time.time() - t < 2.0
    blank = np.full((1, 32, 32, 3), 255, np.uint8)
    assert toy_golden_score(blank, ["a red circle on a white background"])[0] < 0.6


def test_annotators():
    rng = np.random.default_rng(0)
    a, b = np.full(4000, 0.6), np.full(4000, 0.5)
    k = toy_annotate(a, b, 5, rng, noise=0.1)
    assert k.shape == (4000,) and k.min() >= 0 and k.max() <= 5
    from math import erf, sqrt
    p = 0.5 * (1 + erf(0.1 / (0.1 * sqrt(2)) / sqrt(2)))  # P(N(0.1, 2*0.01) > 0)
    assert abs(k.mean() / 5 - p) < 0.02
    assert (toy_annotate(a, a - 1, 3, rng) == 3).all()
