"""A user's folder of real photographs in every common format plus broken input of every kind
(tests/photo_corpus.py), through data/make_shards.py as a user runs it, then the loader as 2 ranks with
0 and 2 workers: every bad file is refused with its path and reason or counted by the loader with its
reason, every good image is delivered exactly once with PIL's own pixels; annotate_colors.py survives
the same folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from photo_corpus import BUCKETS, build_corpus, reference_rgb, refused_images, run_script

from lumina_illus.config import DataConfig
from lumina_illus.data import build_loader
from lumina_illus.data.cursor import merge_states
from lumina_illus.data.shards import iter_tar

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """(corpus, shard folder, make_shards' CompletedProcess), made once for the module."""
    tmp = tmp_path_factory.mktemp("corpus")
    corpus = build_corpus(tmp / "src")
    p = run_script("make_shards.py", str(corpus.root), str(tmp / "shards"), "--samples-per-shard", "5")
    return corpus, tmp / "shards", p


def shard_sources(shards: Path) -> dict[tuple[str, str], str]:
    """(shard file name, tar key) -> the source file (json "source") of every sample the shards hold."""
    out = {}
    for tar in sorted(shards.glob("shard-*.tar")):
        for s in iter_tar(str(tar)):
            assert not isinstance(s, Exception), s
            out[(tar.name, s.key)] = json.loads(s.files["json"])["source"]
    return out


def test_make_shards_accounts_for_every_file(sharded) -> None:
    corpus, shards, p = sharded
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((shards / "refused.json").read_text())
    got = {os.path.relpath(f["path"], corpus.root): f for f in rep["files"]}
    assert {k: f["reason"] for k, f in got.items()} == corpus.refused
    for rel in got:
        assert str(corpus.root / rel) in p.stderr  # named where the user looks
    for rel, fld in (("json_bucket_word", "bucket"), ("json_width_text", "width"), ("json_tags_string", "tags"),
                     ("json_tags_numbers", "tags")):
        assert f"json field '{fld}'" in got[f"bad/{rel}.json"]["message"]
        assert got[f"bad/{rel}.json"]["sample"] == str(corpus.root / f"bad/{rel}.png")
    assert rep["refused"] == {r: list(corpus.refused.values()).count(r) for r in set(corpus.refused.values())}
    assert {os.path.relpath(c["path"], corpus.root): c["format"] for c in rep["converted"]} == corpus.converted
    # every file of the folder that is not a sidecar: a sample, or refused (itself or by its sidecar)
    sources = set(shard_sources(shards).values())
    assert sources == set(corpus.good) | set(corpus.skipped)
    refused = refused_images(corpus)
    files = {os.path.relpath(x, corpus.root) for x in corpus.root.rglob("*")
             if not x.is_dir() and x.suffix not in (".txt", ".json")}
    assert files == sources | set(refused) and not sources & set(refused)
    # captions: byte-order mark stripped, nothing else changed
    for tar in sorted(shards.glob("shard-*.tar")):
        for s in iter_tar(str(tar)):
            src = json.loads(s.files["json"])["source"]
            if src in corpus.captions:
                assert s.files["txt"].decode("utf-8") == corpus.captions[src]


def corpus_cfg(shards: Path, num_workers: int) -> DataConfig:
    return DataConfig(shards=[str(shards / "shard-*.tar")], num_workers=num_workers, prefetch_factor=2, shuffle_buffer=4,
                      batching="tokens", token_budget=400, caption={"caption_dropout": 0.0}, **BUCKETS)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_delivers_each_good_photo_once_with_pils_pixels(sharded, num_workers: int) -> None:
    corpus, shards, p = sharded
    assert p.returncode == 0, p.stderr[-3000:]
    source_of = shard_sources(shards)
    cfg = corpus_cfg(shards, num_workers)
    ranks = [build_loader(cfg, micro_batch=4, rank=r, world_size=2, seed=0) for r in range(2)]
    its = [iter(ld) for ld in ranks]
    delivered: list[str] = []
    skipped: dict[str, str] = {}
    for _ in range(100):  # round-robin over the simulated ranks until epoch 0 is done
        for ld, it in zip(ranks, its):
            batch = next(it)
            for (epoch, _, _), key, img, size in zip(ld.last_sources, batch.keys, batch.images, batch.target_sizes):
                if epoch != 0:
                    continue
                src = source_of[tuple(key.rsplit("/", 1))]
                delivered.append(src)
                want = reference_rgb(corpus.root / src)  # (H, W, 3) uint8
                assert size == want.shape[:2], src  # a bucket equal to the image: no resize, exact pixels
                got = ((img + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)
                assert np.array_equal(got, want), f"{src}: max diff {np.abs(got.astype(int) - want).max()}"
            for skip in ld.last_skips:
                if skip[0] == 0:
                    skipped[source_of[(Path(skip[4]).name, skip[5])]] = skip[3]
        if merge_states([ld.state_dict() for ld in ranks])["cursor"]["epoch"] > 0:
            break
    else:
        raise AssertionError("epoch 0 not finished")
    assert sorted(delivered) == sorted(corpus.good)  # each good photo exactly once across the two ranks
    assert skipped == corpus.skipped
    counts = {}
    for ld in ranks:
        for reason, n in ld.stats()["skipped"].items():
            counts[reason] = counts.get(reason, 0) + n
    for reason in set(corpus.skipped.values()):
        assert counts[reason] >= list(corpus.skipped.values()).count(reason)


def test_annotate_colors_survives_the_corpus(sharded, tmp_path: Path) -> None:
    corpus, _, _ = sharded
    src = tmp_path / "src"
    shutil.copytree(corpus.root, src, symlinks=True)
    p = run_script("annotate_colors.py", str(src), "--workers", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((src / "color_refused.json").read_text())
    got = {os.path.relpath(f["path"], src): f["reason"] for f in rep["files"]}
    assert len(got) == len(rep["files"])  # each once
    # what make_shards refuses (captions are not read here), plus the images only a full decode finds broken
    want = {k: v for k, v in corpus.refused.items() if not k.endswith(".txt")}
    want.update({k: v for k, v in corpus.skipped.items() if v == "truncated_image"})
    assert got == want
    for rel in corpus.good:
        meta = json.loads((src / rel).with_suffix(".json").read_text(encoding="utf-8-sig"))
        assert len(meta["control"]) == 6, rel
