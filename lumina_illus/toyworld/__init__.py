"""The toy illustration world: a procedural, seeded stand-in for an anime dataset, small enough that a
tiny Lumina or SDXL learns its characters on a CPU in minutes.

    spec.py        the roster (characters, looks, tags) and the long-tailed sample counts
    render.py      PIL drawing of one sample (background, character, pose, framing)
    world.py       sampling a world from a seed, tags/captions, shards + characters.csv on disk
    vae_train.py   brief training of the tiny Flux-architecture VAE on world renders
    tagger.py      a WD-format tagger (model.onnx + selected_tags.csv) trained on world renders
    components.py  everything above built once and cached under <out>/components/
"""

# Bumped whenever renders, tags or component training change, so caches keyed by it rebuild.
WORLD_VERSION = 1
