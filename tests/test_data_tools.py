"""The data scripts, run as users run them: make_shards.py (folder and CSV index), annotate_colors.py
(statistics, quartile tokens, resume), cache_latents.py (latents equal LatentCodec.encode of what the
image pipeline feeds, read back through the same loader)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from photo_corpus import run_script
from PIL import Image

from lumina_illus.config import DataConfig
from lumina_illus.data import build_loader
from lumina_illus.data.shards import iter_tar

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    p = run_script(script, *args)
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
    assert m["skipped"] == {"corrupt_image": 1}
    rep = json.loads((tmp_path / "shards" / "refused.json").read_text())
    assert rep["refused"] == {"corrupt_image": 1} and rep["files"][0]["path"] == str(tmp_path / "src" / "broken.png")
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
    p = run_script("make_shards.py", str(tmp_path / "i.csv"), str(tmp_path / "o"))
    assert p.returncode != 0 and "i.csv" in p.stderr and "'image'" in p.stderr


def test_annotate_colors_writes_stats_and_quartile_tokens_and_resumes(tmp_path: Path) -> None:
    make_folder(tmp_path / "src")
    out = run("annotate_colors.py", str(tmp_path / "src"), "--workers", "2")
    assert "9 images, 1 refused, 8 jsons updated" in out.stdout and "broken.png" in out.stderr
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


def _png(path: Path, seed: int, size: tuple[int, int] = (96, 64), mode: str = "RGB", fmt: str = "PNG") -> None:
    a = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).convert(mode).save(path, fmt)


def test_make_shards_refuses_bad_sidecars_and_files_by_path_and_goes_on(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    tags = json.dumps({"tags": {"general": ["smile"]}})
    for name in "abcdefghi":
        _png(src / f"{name}.png", seed=ord(name))
        (src / f"{name}.json").write_text(tags)
    (src / "a.txt").write_text("\ufeffhello", encoding="utf-8")  # a byte-order mark: not part of the caption
    (src / "b.txt").write_bytes(b"caf\xe9 au lait")  # Latin-1, not UTF-8
    (src / "c.json").write_bytes(b"\xef\xbb\xbf" + tags.encode())  # json with a byte-order mark: fine
    (src / "d.json").write_text(json.dumps({"bucket": "portrait", "tags": ["x"]}))
    (src / "e.json").write_text(json.dumps({"width": "wide", "height": 64, "tags": ["x"]}))
    (src / "f.json").write_text(json.dumps({"tags": {"general": "smile"}}))
    (src / "g.json").write_text("[1, 2]")
    (src / "h.json").write_bytes(b'{"tags": ["caf\xe9"]}')
    (src / "i.json").write_text('{"tags": ["x"],')
    _png(src / "anim.gif", seed=1, mode="P", fmt="GIF")  # not jpg/png/webp, but PIL reads it: converted
    (src / "anim.txt").write_text("a gif")
    _png(src / "pic.bmp", seed=2, fmt="BMP")
    (src / "pic.txt").write_text("a bmp")
    (src / "fake.bmp").write_bytes(b"BM not really")
    (src / "notes.md").write_text("# my dataset\n")
    (src / "x.jpg").mkdir()  # a folder named like an image is walked like any folder
    _png(src / "x.jpg" / "inner.png", seed=3)
    (src / "x.jpg" / "inner.txt").write_text("inside")
    (src / "gone.png").symlink_to(src / "nowhere.png")
    (src / "lonely.txt").write_text("no image")

    p = run_script("make_shards.py", str(src), str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((tmp_path / "out" / "refused.json").read_text())
    got = {f["path"]: (f["reason"], f["message"]) for f in rep["files"]}
    want = {"b.txt": "bad_caption_encoding", "d.json": "bad_json", "e.json": "bad_json", "f.json": "bad_json",
            "g.json": "bad_json", "h.json": "bad_json", "i.json": "bad_json", "fake.bmp": "unsupported_type",
            "notes.md": "unsupported_type", "gone.png": "not_a_file"}
    assert {k: v[0] for k, v in got.items()} == {str(src / k): r for k, r in want.items()}
    assert "'bucket'" in got[str(src / "d.json")][1] and "'width'" in got[str(src / "e.json")][1]
    assert "'tags'" in got[str(src / "f.json")][1]
    assert {f["sample"] for f in rep["files"] if "sample" in f} == {str(src / f"{n}.png") for n in "bdefghi"}
    assert rep["refused"] == {"bad_json": 6, "unsupported_type": 2, "bad_caption_encoding": 1, "not_a_file": 1}
    assert rep["unused_sidecars"] == [str(src / "lonely.txt")]
    assert sorted(c["format"] for c in rep["converted"]) == ["BMP", "GIF"]
    for path in want:
        assert str(src / path) in p.stderr  # each refused file named where the user looks
    assert "bad_json" in p.stderr and "6" in p.stderr  # the table

    shard = list(iter_tar(str(tmp_path / "out" / "shard-000000.tar")))
    by_source = {json.loads(s.files["json"])["source"]: s for s in shard}
    assert sorted(by_source) == ["a.png", "anim.gif", "c.png", "pic.bmp", "x.jpg/inner.png"]
    assert by_source["a.png"].files["txt"] == b"hello"
    assert json.loads(by_source["c.png"].files["json"])["tags"] == {"general": ["smile"]}
    for name in ("anim.gif", "pic.bmp"):  # converted losslessly: same pixels as PIL's decode of the file
        s = by_source[name]
        assert set(s.files) == {"png", "json", "txt"}
        with Image.open(src / name) as ref, Image.open(io.BytesIO(s.files["png"])) as conv:
            assert conv.format == "PNG" and conv.mode == ref.mode and np.array_equal(np.asarray(conv.convert("RGB")), np.asarray(ref.convert("RGB")))

    strict = run_script("make_shards.py", str(src), str(tmp_path / "strict"), "--strict")
    assert strict.returncode == 1 and "--strict" in strict.stderr
    assert (tmp_path / "strict" / "shard-000000.tar").is_file()  # written all the same
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zero.jpg").write_bytes(b"")
    nothing = run_script("make_shards.py", str(bad), str(tmp_path / "nothing"))
    assert nothing.returncode == 1 and "nothing usable" in nothing.stderr and "zero.jpg" in nothing.stderr


def test_make_shards_index_with_byte_order_mark_and_a_bad_json_cell(tmp_path: Path) -> None:
    make_folder(tmp_path / "src", n=2)
    (tmp_path / "src" / "i.csv").write_text('image,caption,json\nimg0.png,first,\nimg1.png,second,{"bucket": "tall"}\n'
                                            'img1.png,third,{oops\n', encoding="utf-8-sig")  # as spreadsheets save
    p = run_script("make_shards.py", str(tmp_path / "src" / "i.csv"), str(tmp_path / "o"))
    assert p.returncode == 0, p.stderr[-3000:]
    got = list(iter_tar(str(tmp_path / "o" / "shard-000000.tar")))
    assert [g.files["txt"] for g in got] == [b"first"]
    rep = json.loads((tmp_path / "o" / "refused.json").read_text())
    assert [(f["reason"], f["sample"]) for f in rep["files"]] == [
        ("bad_json", f"{tmp_path / 'src' / 'i.csv'} row 2"), ("bad_json", f"{tmp_path / 'src' / 'i.csv'} row 3")]


def test_write_shards_names_the_sample_and_the_field(tmp_path: Path) -> None:
    from lumina_illus.data.shards import write_shards

    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "PNG")
    good = {"__key__": "ok", "png": buf.getvalue(), "json": {"tags": ["x"]}}
    for bad, field in [({"bucket": "portrait"}, "'bucket'"), ({"width": "64", "height": 64}, "'width'"),
                       ({"tags": {"general": "smile"}}, "'tags'"), ({"bucket": [64]}, "'bucket'")]:
        with pytest.raises(ValueError, match=f"'k1'.*{field}"):
            write_shards([good, {"__key__": "k1", "png": buf.getvalue(), "json": bad}], tmp_path / "o", 10)
    with pytest.raises(ValueError, match="'k2'.*'cls'"):
        write_shards([{"__key__": "k2", "png": buf.getvalue(), "cls": 3}], tmp_path / "o", 10)
    with pytest.raises(ValueError, match="'k3'"):
        write_shards([{"__key__": "k3", "png": buf.getvalue(), "json": {"tags": ["x"], "when": object()}}], tmp_path / "o", 10)
    # json that does not parse is written as it is: the loader counts it (bad_json)
    m = write_shards([good, {"__key__": "k4", "png": buf.getvalue(), "json": b"{not json"}], tmp_path / "o", 10)
    assert m["samples"] == 2


def test_annotate_colors_refuses_bad_sidecars_and_tokens_every_good_image(tmp_path: Path) -> None:
    make_folder(tmp_path / "src")
    src = tmp_path / "src"
    (src / "img2.json").write_text('{"tags": {"character": ["c2"]')  # malformed
    (src / "img3.json").write_bytes(b'{"tags": ["caf\xe9"]}')  # not UTF-8
    (src / "img4.json").write_text(json.dumps({"tags": ["x"], "bucket": "portrait"}))  # a field of the wrong type
    (src / "img5.json").write_bytes(b"\xef\xbb\xbf" + (src / "img5.json").read_bytes())  # a byte-order mark: fine
    p = run_script("annotate_colors.py", str(src), "--workers", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((src / "color_refused.json").read_text())
    assert len(rep["files"]) == 4 and {f["path"]: f["reason"] for f in rep["files"]} == {
        str(src / "broken.png"): "corrupt_image", str(src / "img2.json"): "bad_json",
        str(src / "img3.json"): "bad_json", str(src / "img4.json"): "bad_json"}
    for f in ("broken.png", "img2.json", "img3.json", "img4.json"):
        assert str(src / f) in p.stderr
    for i in (0, 1, 5, 6, 7):
        meta = json.loads((src / f"img{i}.json").read_text(encoding="utf-8-sig"))
        assert len(meta["control"]) == 6, i
    assert (src / "img2.json").read_text() == '{"tags": {"character": ["c2"]'  # left as it was
    assert run_script("annotate_colors.py", str(src), "--workers", "1", "--strict").returncode == 1


def test_cache_latents_refuses_bad_samples_and_short_shards_and_goes_on(tmp_path: Path) -> None:
    from lumina_illus.data.shards import write_shards
    from lumina_illus.models.tiny import make_tiny_flux_vae

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    write_shards([{"__key__": "good", "png": png, "json": b"\xef\xbb\xbf" + json.dumps({"tags": ["x"]}).encode()},
                  {"__key__": "corrupt", "png": b"not an image" * 10, "json": {"tags": ["x"]}},
                  {"__key__": "nocap", "png": png}], tmp_path / "a", 10, prefix="a")
    with tarfile.open(tmp_path / "a" / "a-000000.tar", "a") as tar:  # shards from elsewhere: json unchecked
        for name, data in (("badjson.png", png), ("badjson.json", b'{"tags": ["x"], "width": "wide"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_shards([{"__key__": "cut", "png": png, "json": {"tags": ["x"]}}], tmp_path / "b", 10, prefix="b")
    short = tmp_path / "b" / "b-000000.tar"
    short.write_bytes(short.read_bytes()[:700])  # inside the image member
    vae_dir = make_tiny_flux_vae(tmp_path / "vae")
    data = {"shards": [str(tmp_path / "a" / "a-000000.tar"), str(short)], "min_area": 64 * 64, "max_area": 64 * 64,
            "num_workers": 0, "caption": {"caption_dropout": 0.0}}
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump({"family": "lumina2", "model": {"arch": {"preset": "tiny"},
                                                                       "vae": {"path": str(vae_dir)}}, "data": data}))
    args = (str(cfg_path), str(tmp_path / "latents"), "--dtype", "fp32", "--device", "cpu")
    p = run_script("cache_latents.py", *args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "1 latent samples" in p.stdout
    rep = json.loads((tmp_path / "latents" / "refused.json").read_text())
    got = sorted((f["path"], f.get("sample", ""), f["reason"]) for f in rep["files"])
    a = str(tmp_path / "a" / "a-000000.tar")
    assert got == sorted([(a, "corrupt", "corrupt_image"), (a, "nocap", "missing_caption"), (a, "badjson", "bad_json"),
                          (str(short), "", "truncated_tar")])
    for key in ("corrupt", "nocap", "badjson"):
        assert f"{key} left out" in p.stderr
    assert run_script("cache_latents.py", *args, "--strict").returncode == 1


@pytest.mark.parametrize("script", ["make_shards.py", "annotate_colors.py", "cache_latents.py"])
def test_scripts_help_and_docstring_command(script: str) -> None:
    p = run_script(script, "--help")
    assert p.returncode == 0 and "--strict" in p.stdout and "refused" in p.stdout, p.stderr[-2000:]
    doc = (ROOT / "data" / script).read_text().split('"""')[1]
    assert doc.startswith(f"python data/{script} ") and "[--strict]" in doc.splitlines()[0]


def test_make_shards_into_a_folder_inside_the_source_ignores_its_own_output(tmp_path: Path) -> None:
    make_folder(tmp_path / "src", n=3)
    out = tmp_path / "src" / "shards"
    run("make_shards.py", str(tmp_path / "src"), str(out))
    again = run("make_shards.py", str(tmp_path / "src"), str(out))  # shard-*.tar, manifest and report are not input
    rep = json.loads((out / "refused.json").read_text())
    assert [f["path"] for f in rep["files"]] == [str(tmp_path / "src" / "broken.png")] and "3 samples" in again.stdout
