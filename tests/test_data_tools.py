"""The data scripts, run as users run them: make_shards.py (folder and CSV index), annotate_colors.py
(statistics, quartile tokens, resume), cache_latents.py (latents equal LatentCodec.encode of what the
image pipeline feeds, read back through the same loader)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lumina_illus.config import DataConfig
from lumina_illus.data import build_loader
from lumina_illus.data.shards import iter_tar

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(ROOT / "data" / script), *args], capture_output=True, text=True,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def make_folder(root: Path, n: int = 8) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        h, w = [(256, 256), (256, 512), (384, 256)][i % 3]
        a = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        a = (a.astype(np.float64) * (i + 1) / n).astype(np.uint8)  # brightness grows with i: quartile levels are predictable
        Image.fromarray(a).save(root / f"img{i}.png")
        (root / f"img{i}.json").write_text(json.dumps({"tags": {"character": [f"c{i}"], "general": ["smile"]}}))
        if i % 2:
            (root / f"img{i}.txt").write_text(f"picture number {i}")
    (root / "broken.png").write_bytes(b"garbage" * 20)


def test_make_shards_from_folder_and_csv(tmp_path: Path) -> None:
    make_folder(tmp_path / "src")
    out = run("make_shards.py", str(tmp_path / "src"), str(tmp_path / "shards"), "--samples-per-shard", "3")
    assert "verified" in out.stdout and "broken.png" in out.stderr
    m = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert m["samples"] == 8 and [s["samples"] for s in m["shards"]] == [3, 3, 2]
    assert m["skipped"] == {"unreadable_image": 1}
    assert m["bytes"] == sum((tmp_path / "shards" / s["name"]).stat().st_size for s in m["shards"])
    # default buckets (256^2 .. 1024^2): each image is at the 256^2 level; 1:2 -> 192x320, 3:2 -> 320x192
    assert m["buckets"] == {"256x256": 3, "192x320": 3, "320x192": 2}
    samples = [s for sh in m["shards"] for s in iter_tar(str(tmp_path / "shards" / sh["name"]))]
    assert all(not isinstance(s, Exception) for s in samples)
    s1 = samples[1]
    assert json.loads(s1.files["json"])["source"] == "img1.png" and s1.files["txt"] == b"picture number 1"
    assert s1.files["png"] == (tmp_path / "src" / "img1.png").read_bytes()  # bytes copied unchanged

    with open(tmp_path / "src" / "index.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["image", "caption", "character", "general"])
        for i in range(4):
            wr.writerow([f"img{i}.png", f"caption {i}", f"char_{i}", "smile, open_mouth"])
    run("make_shards.py", str(tmp_path / "src" / "index.csv"), str(tmp_path / "csv"), "--samples-per-shard", "10")
    got = list(iter_tar(str(tmp_path / "csv" / "shard-000000.tar")))
    assert len(got) == 4
    meta = json.loads(got[2].files["json"])
    assert meta["tags"] == {"character": ["char_2"], "general": ["smile", "open_mouth"]}
    assert got[2].files["txt"] == b"caption 2"

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": ["img0.png", "img5.png"], "json": ['{"tags": {"meta": ["highres"]}}', None]}),
                   tmp_path / "src" / "index.parquet")
    run("make_shards.py", str(tmp_path / "src" / "index.parquet"), str(tmp_path / "pq"))
    got = list(iter_tar(str(tmp_path / "pq" / "shard-000000.tar")))
    assert [json.loads(g.files["json"]).get("tags") for g in got] == [{"meta": ["highres"]}, None]


def test_make_shards_names_bad_index(tmp_path: Path) -> None:
    (tmp_path / "i.csv").write_text("path,caption\nx.png,hi\n")
    p = subprocess.run([sys.executable, str(ROOT / "data" / "make_shards.py"), str(tmp_path / "i.csv"),
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode != 0 and "i.csv" in p.stderr and "'image'" in p.stderr


def test_annotate_colors_writes_stats_and_quartile_tokens_and_resumes(tmp_path: Path) -> None:
    make_folder(tmp_path / "src")
    out = run("annotate_colors.py", str(tmp_path / "src"), "--workers", "2")
    assert "9 images, 1 unreadable, 8 jsons updated" in out.stdout and "broken.png" in out.stderr
    metas = [json.loads((tmp_path / "src" / f"img{i}.json").read_text()) for i in range(8)]
    assert all(set(m["control"]) == {"contrast", "brightness", "sharpness", "dynamic_colors", "colorfulness",
                                     "saturation"} for m in metas)
    assert metas[0]["control"]["brightness"] == "dark" and metas[7]["control"]["brightness"] == "very bright"
    assert all(m["tags"]["general"] == ["smile"] for m in metas)  # existing fields kept
    assert all(isinstance(m["colorful"], bool) for m in metas)
    edges = json.loads((tmp_path / "src" / "color_quartiles.json").read_text())
    bright = sorted(m["color"]["brightness"] for m in metas)
    assert edges["brightness"] == pytest.approx(np.percentile(bright, [25, 50, 75]).tolist())
    again = run("annotate_colors.py", str(tmp_path / "src"), "--workers", "1")
    assert "0 jsons updated" in again.stdout  # resumed: nothing recomputed or rewritten


def test_cache_latents_round_trip_through_the_loader(tmp_path: Path) -> None:
    from lumina_illus.models.tiny import make_tiny_flux_vae
    from lumina_illus.models.vae import LatentCodec, VAEConfig

    make_folder(tmp_path / "src", n=4)
    run("make_shards.py", str(tmp_path / "src"), str(tmp_path / "shards"), "--samples-per-shard", "4")
    vae_dir = make_tiny_flux_vae(tmp_path / "vae")
    data = {"shards": [str(tmp_path / "shards" / "shard-000000.tar")], "min_area": 64 * 64, "max_area": 128 * 128,
            "area_step": 64, "num_workers": 0, "shuffle_buffer": 1, "batching": "bucket",
            "caption": {"caption_dropout": 0.0}}
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump({"family": "lumina2", "model": {"arch": {"preset": "tiny"}, "vae": {"path": str(vae_dir)}},
                                        "data": data}))
    out = run("cache_latents.py", str(cfg_path), str(tmp_path / "latents"), "--dtype", "fp32", "--device", "cpu")
    assert "4 latent samples" in out.stdout

    img_cfg = DataConfig(**data)
    lat_cfg = DataConfig(**{**data, "shards": [str(tmp_path / "latents" / "shard-000000.tar")], "cached_latents": True})
    codec = LatentCodec(VAEConfig(path=str(vae_dir)))
    imgs = {}
    it = iter(build_loader(img_cfg, micro_batch=1, rank=0, world_size=1, seed=0))
    for _ in range(4):
        b = next(it)
        imgs[b.keys[0].split("/")[-1]] = b
    it = iter(build_loader(lat_cfg, micro_batch=1, rank=0, world_size=1, seed=0))
    for _ in range(4):
        lb = next(it)
        assert lb.images is None and lb.latents is not None
        src = imgs[lb.keys[0].split("/")[-1].split("_", 1)[1]]
        ref = codec.encode(src.images)[0]  # (16, H/8, W/8)
        assert lb.latents[0].shape == ref.shape == (16, src.target_sizes[0][0] // 8, src.target_sizes[0][1] // 8)
        torch.testing.assert_close(lb.latents[0], ref, atol=1e-5, rtol=1e-5)
        assert lb.target_sizes == src.target_sizes and lb.crops == src.crops
        assert lb.original_sizes == src.original_sizes
        assert lb.captions[0].startswith(("c", "picture number"))  # tags or the .txt, built at load time


def test_cache_latents_with_text_embeds(tmp_path: Path) -> None:
    from lumina_illus.models.text_encoder import GemmaTextEncoder, TextEncoderConfig
    from lumina_illus.models.tiny import make_tiny_flux_vae, make_tiny_gemma2

    make_folder(tmp_path / "src", n=3)
    run("make_shards.py", str(tmp_path / "src"), str(tmp_path / "shards"))
    vae_dir = make_tiny_flux_vae(tmp_path / "vae")
    gemma = make_tiny_gemma2(tmp_path / "gemma", vocab_corpus=["c0 c1 c2 smile picture number 0 1 2"])
    data = {"shards": [str(tmp_path / "shards" / "shard-000000.tar")], "min_area": 64 * 64, "max_area": 128 * 128,
            "area_step": 64, "num_workers": 0, "shuffle_buffer": 1, "batching": "bucket",
            "caption": {"caption_dropout": 0.0}}
    te = {"path": str(gemma), "dtype": "fp32"}
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump({"family": "lumina2", "model": {"arch": {"preset": "tiny"}, "vae": {"path": str(vae_dir)},
                                                                       "text_encoder": te}, "data": data}))
    run("cache_latents.py", str(cfg_path), str(tmp_path / "latents"), "--dtype", "fp32", "--device", "cpu",
        "--text-embeds")
    enc = GemmaTextEncoder(TextEncoderConfig(**te))
    lat = DataConfig(**{**data, "shards": [str(tmp_path / "latents" / "shard-000000.tar")], "cached_latents": True})
    it = iter(build_loader(lat, micro_batch=1, rank=0, world_size=1, seed=0))
    for _ in range(3):
        b = next(it)
        assert b.text_embeds is not None and b.latents is not None
        feats, mask = enc.encode(b.captions)  # the cached caption, encoded again: (1, L, D), (1, L)
        torch.testing.assert_close(b.text_embeds[0], feats[0][mask[0]], atol=1e-5, rtol=1e-5)
