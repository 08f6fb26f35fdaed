"""Draw one toy-world scene with PIL: background, then a chibi character in flat anime colours with dark
line art. Scenes are drawn at `SUPERSAMPLE` times the target size and downsampled, so edges are
anti-aliased like real illustrations.

    img = render(Scene(character=CHARACTERS[0], background="outdoors", pose="waving", ...))
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from lumina_illus.toyworld.spec import EYE_COLORS, HAIR_COLORS, OUTFIT_COLORS, RGB, Character

SUPERSAMPLE = 2
SKIN: RGB = (255, 225, 200)
LINE: RGB = (40, 30, 35)


@dataclass(frozen=True)
class Scene:
    character: Character | None  # None: background only (tagger negatives)
    background: str  # one of spec.BACKGROUNDS
    pose: str  # one of spec.POSES
    framing: str  # "full_body" | "upper_body"
    expression: str  # one of spec.EXPRESSIONS
    size: tuple[int, int]  # (width, height) pixels
    x: float  # horizontal centre of the character, fraction of the width
    scale: float  # figure size multiplier around 1.0
    detail_seed: int  # clouds, stars, gradient colours


def _shade(c: RGB, f: float) -> RGB:
    return tuple(max(0, min(255, int(v * f))) for v in c)  # type: ignore[return-value]


def _draw_background(img: Image.Image, kind: str, rng: random.Random) -> None:
    w, h = img.size
    d = ImageDraw.Draw(img)

    def vgradient(top: RGB, bottom: RGB, y0: int = 0, y1: int = h) -> None:
        a = np.linspace(0.0, 1.0, y1 - y0)[:, None]  # (rows, 1)
        rows = (np.array(top) * (1 - a) + np.array(bottom) * a).astype(np.uint8)  # (rows, 3)
        img.paste(Image.fromarray(np.repeat(rows[:, None, :], w, axis=1)), (0, y0))  # (rows, w, 3)

    if kind == "white":
        d.rectangle([0, 0, w, h], fill=(250, 250, 250))
    elif kind == "blue":
        d.rectangle([0, 0, w, h], fill=(165, 200, 245))
    elif kind == "pink":
        d.rectangle([0, 0, w, h], fill=(250, 205, 225))
    elif kind == "gradient":
        pastel = [(255, 240, 180), (200, 240, 255), (230, 210, 255), (210, 255, 220), (255, 215, 200)]
        top, bottom = rng.sample(pastel, 2)
        vgradient(top, bottom)
    elif kind == "outdoors":
        horizon = int(h * rng.uniform(0.6, 0.75))
        vgradient((110, 170, 240), (190, 225, 255), 0, horizon)
        d.rectangle([0, horizon, w, h], fill=(90, 180, 80))
        for _ in range(rng.randint(1, 3)):  # clouds
            cx, cy, s = rng.uniform(0, w), rng.uniform(0, horizon * 0.5), rng.uniform(0.08, 0.15) * w
            for dx in (-0.6, 0.0, 0.6):
                d.ellipse([cx + dx * s - s * 0.6, cy - s * 0.4, cx + dx * s + s * 0.6, cy + s * 0.4], fill=(250, 250, 255))
    elif kind == "night":
        vgradient((10, 15, 50), (40, 40, 100))
        for _ in range(rng.randint(8, 16)):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h * 0.7), max(1.0, w * 0.006)
            d.ellipse([x - r, y - r, x + r, y + r], fill=(255, 250, 200))
    elif kind == "indoors":
        floor = int(h * rng.uniform(0.7, 0.8))
        d.rectangle([0, 0, w, floor], fill=(240, 225, 195))
        d.rectangle([0, floor, w, h], fill=(160, 105, 60))
        step = w / rng.choice([4, 5, 6])
        x = 0.0
        while x < w:  # floor planks
            d.line([(x, floor), (x - step * 0.5, h)], fill=(120, 75, 40), width=max(1, w // 150))
            x += step
        wx = rng.uniform(0.05, 0.6) * w  # a window
        d.rectangle([wx, h * 0.12, wx + w * 0.3, h * 0.45], fill=(180, 220, 255), outline=(255, 255, 255), width=max(1, w // 80))
    elif kind == "sunset":
        horizon = int(h * rng.uniform(0.65, 0.8))
        vgradient((120, 60, 140), (255, 150, 60), 0, horizon)
        d.rectangle([0, horizon, w, h], fill=(70, 50, 70))
        sx, r = rng.uniform(0.1, 0.9) * w, w * 0.08
        d.pieslice([sx - r, horizon - r, sx + r, horizon + r], 180, 360, fill=(255, 220, 120))
    else:
        raise ValueError(f"unknown background {kind!r}")


def _draw_character(d: ImageDraw.ImageDraw, s: Scene, w: int, h: int) -> None:
    ch = s.character
    assert ch is not None
    hair, eyes = HAIR_COLORS[ch.hair_color], EYE_COLORS[ch.eye_color]
    cloth = OUTFIT_COLORS[ch.outfit_color]
    # head radius r sets every other distance: full body = ~4.4 r tall, upper body crops at the waist
    if s.framing == "full_body":
        r = h * 0.19 * s.scale
        cx, cy = s.x * w, h * 0.94 - 3.5 * r
    else:
        r = h * 0.27 * s.scale
        cx, cy = s.x * w, h * 0.42
    lw = max(1, round(r * 0.07))  # line-art width
    ol = {"outline": LINE, "width": lw}

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:  # offsets in units of r
        return [cx + x0 * r, cy + y0 * r, cx + x1 * r, cy + y1 * r]

    def poly(*pts: tuple[float, float]) -> list[tuple[float, float]]:
        return [(cx + x * r, cy + y * r) for x, y in pts]

    # 1. hair behind the body
    if ch.hair_style == "long_hair":
        d.rounded_rectangle(box(-1.2, -0.8, 1.2, 2.7), radius=r * 0.5, fill=hair, **ol)
    elif ch.hair_style == "twintails":
        for sgn in (-1, 1):
            d.ellipse(box(sgn * 1.3 - 0.45, 0.0, sgn * 1.3 + 0.45, 2.4), fill=hair, **ol)
    elif ch.hair_style == "ponytail":
        d.ellipse(box(0.7, -0.4, 1.6, 1.9), fill=hair, **ol)
    elif ch.hair_style == "bob_cut":
        d.rounded_rectangle(box(-1.15, -1.0, 1.15, 1.0), radius=r * 0.45, fill=hair, **ol)
    # 2. legs, body, arms
    pants = _shade(cloth, 0.7) if ch.gender == "boy" or ch.outfit == "armor" else SKIN
    for sgn in (-1, 1):
        d.rectangle(box(sgn * 0.35 - 0.2, 2.3, sgn * 0.35 + 0.2, 3.35), fill=pants, **ol)
        d.ellipse(box(sgn * 0.35 - 0.3, 3.2, sgn * 0.35 + 0.3, 3.55), fill=(70, 45, 40), **ol)
    if ch.outfit in ("dress", "kimono"):
        d.polygon(poly((-0.75, 0.9), (0.75, 0.9), (1.25, 2.9), (-1.25, 2.9)), fill=cloth, **ol)
    else:
        d.polygon(poly((-0.8, 0.9), (0.8, 0.9), (0.7, 2.45), (-0.7, 2.45)), fill=cloth, **ol)
    arms = {
        "standing": [(1.0, 1.3, 1.15, 2.3), (-1.0, 1.3, -1.15, 2.3)],
        "arms_up": [(1.05, 0.5, 1.35, -0.5), (-1.05, 0.5, -1.35, -0.5)],
        "waving": [(1.05, 0.5, 1.4, -0.4), (-1.0, 1.3, -1.15, 2.3)],
        "hands_on_hips": [(1.35, 1.6, 0.75, 2.2), (-1.35, 1.6, -0.75, 2.2)],
    }[s.pose]
    for ex, ey, hx, hy in arms:  # shoulder -> elbow -> hand, sleeve in the outfit colour
        sx = 0.7 if ex > 0 else -0.7
        pts = poly((sx, 1.0), (ex, ey), (hx, hy))
        d.line(pts, fill=LINE, width=round(r * 0.42) + 2 * lw, joint="curve")
        d.line(pts, fill=cloth, width=round(r * 0.42), joint="curve")
        d.ellipse(box(hx - 0.2, hy - 0.2, hx + 0.2, hy + 0.2), fill=SKIN, **ol)
    # 3. outfit details
    if ch.outfit == "school_uniform":
        d.polygon(poly((-0.7, 0.9), (0.7, 0.9), (0.0, 1.6)), fill=(250, 250, 250), **ol)
        d.polygon(poly((0.0, 1.45), (-0.3, 1.25), (-0.3, 1.7)), fill=(220, 30, 50), **ol)
        d.polygon(poly((0.0, 1.45), (0.3, 1.25), (0.3, 1.7)), fill=(220, 30, 50), **ol)
    elif ch.outfit == "hoodie":
        d.rectangle(box(-0.4, 1.8, 0.4, 2.25), fill=_shade(cloth, 0.85), **ol)
        d.line(poly((-0.15, 1.0), (-0.15, 1.5)), fill=LINE, width=lw)
        d.line(poly((0.15, 1.0), (0.15, 1.5)), fill=LINE, width=lw)
    elif ch.outfit == "armor":
        for sgn in (-1, 1):
            d.ellipse(box(sgn * 0.85 - 0.35, 0.75, sgn * 0.85 + 0.35, 1.35), fill=_shade(cloth, 1.3), **ol)
        d.rectangle(box(-0.45, 1.3, 0.45, 2.0), fill=_shade(cloth, 1.25), **ol)
    elif ch.outfit == "kimono":
        d.line(poly((-0.5, 0.9), (0.15, 1.6)), fill=(250, 250, 250), width=lw * 3)
        d.line(poly((0.5, 0.9), (-0.15, 1.6)), fill=(250, 250, 250), width=lw * 3)
        d.rectangle(box(-0.85, 1.75, 0.85, 2.1), fill=(240, 200, 60), **ol)
    elif ch.outfit == "suit":
        d.polygon(poly((-0.35, 0.9), (0.35, 0.9), (0.0, 1.7)), fill=(250, 250, 250), **ol)
        d.polygon(poly((-0.08, 1.0), (0.08, 1.0), (0.12, 1.6), (0.0, 1.75), (-0.12, 1.6)), fill=(200, 20, 40))
    elif ch.outfit == "dress":
        d.line(poly((-1.0, 2.6), (1.0, 2.6)), fill=(250, 250, 250), width=lw * 3)
    # 4. head, face, front hair
    d.ellipse(box(-1.0, -1.0, 1.0, 1.0), fill=SKIN, **ol)
    if ch.hair_style == "spiky_hair":
        spikes = [(-1.05, 0.0), (-1.2, -0.9), (-0.6, -0.6), (-0.5, -1.5), (0.0, -0.8), (0.4, -1.6), (0.6, -0.6), (1.2, -1.0), (1.05, 0.0), (0.6, -0.2), (0.0, -0.35), (-0.6, -0.2)]
        d.polygon(poly(*spikes), fill=hair, **ol)
    else:
        d.chord(box(-1.08, -1.1, 1.08, 0.9), 180, 360, fill=hair, **ol)
        d.polygon(poly((-1.0, -0.25), (-0.6, 0.05), (-0.35, -0.25), (0.0, 0.1), (0.35, -0.25), (0.6, 0.05), (1.0, -0.25), (1.0, -0.35), (-1.0, -0.35)), fill=hair)
    for sgn in (-1, 1):
        d.ellipse(box(sgn * 0.38 - 0.17, 0.05, sgn * 0.38 + 0.17, 0.5), fill=eyes, **ol)
        d.ellipse(box(sgn * 0.38 - 0.08, 0.08, sgn * 0.38 + 0.02, 0.22), fill=(255, 255, 255))
    if s.expression == "smile":
        d.arc(box(-0.22, 0.45, 0.22, 0.75), 20, 160, fill=LINE, width=lw)
    elif s.expression == "open_mouth":
        d.ellipse(box(-0.13, 0.58, 0.13, 0.8), fill=(200, 60, 70), **ol)
    else:
        d.line(poly((-0.12, 0.68), (0.12, 0.68)), fill=LINE, width=lw)
    # 5. accessory
    acc = ch.accessory
    if acc == "hair_ribbon":
        d.polygon(poly((0.55, -0.85), (0.15, -1.2), (0.15, -0.55)), fill=(230, 30, 60), **ol)
        d.polygon(poly((0.55, -0.85), (0.95, -1.2), (0.95, -0.55)), fill=(230, 30, 60), **ol)
    elif acc == "hat":
        d.polygon(poly((-0.55, -0.85), (0.55, -0.85), (0.2, -2.1)), fill=_shade(cloth, 1.5) if ch.outfit_color == "black" else cloth, **ol)
        d.ellipse(box(-1.45, -1.05, 1.45, -0.7), fill=(60, 40, 90), **ol)
    elif acc == "glasses":
        for sgn in (-1, 1):
            d.ellipse(box(sgn * 0.38 - 0.3, 0.0, sgn * 0.38 + 0.3, 0.55), outline=LINE, width=lw * 2)
        d.line(poly((-0.08, 0.2), (0.08, 0.2)), fill=LINE, width=lw * 2)
    elif acc == "cat_ears":
        for sgn in (-1, 1):
            d.polygon(poly((sgn * 0.9, -0.6), (sgn * 0.25, -0.95), (sgn * 0.85, -1.6)), fill=hair, **ol)
            d.polygon(poly((sgn * 0.75, -0.8), (sgn * 0.45, -0.95), (sgn * 0.75, -1.35)), fill=(250, 160, 190))
    elif acc == "halo":
        d.ellipse(box(-0.7, -1.65, 0.7, -1.3), outline=(255, 215, 40), width=lw * 3)
    elif acc == "horns":
        for sgn in (-1, 1):
            d.polygon(poly((sgn * 0.35, -0.95), (sgn * 0.7, -0.85), (sgn * 0.75, -1.6)), fill=(60, 50, 60), **ol)
    elif acc == "headphones":
        d.arc(box(-1.15, -1.25, 1.15, 1.0), 180, 360, fill=(60, 60, 70), width=lw * 3)
        for sgn in (-1, 1):
            d.ellipse(box(sgn * 1.05 - 0.25, -0.2, sgn * 1.05 + 0.25, 0.45), fill=(230, 50, 60), **ol)
    elif acc == "hair_flower":
        for dx, dy in ((0.0, -0.18), (0.17, -0.05), (0.1, 0.15), (-0.1, 0.15), (-0.17, -0.05)):
            d.ellipse(box(-0.75 + dx - 0.14, -0.75 + dy - 0.14, -0.75 + dx + 0.14, -0.75 + dy + 0.14), fill=(255, 120, 170), **ol)
        d.ellipse(box(-0.83, -0.83, -0.67, -0.67), fill=(255, 230, 80))


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of `scene.size`."""
    w, h = scene.size
    big = Image.new("RGB", (w * SUPERSAMPLE, h * SUPERSAMPLE))
    _draw_background(big, scene.background, random.Random(scene.detail_seed))
    if scene.character is not None:
        _draw_character(ImageDraw.Draw(big), scene, w * SUPERSAMPLE, h * SUPERSAMPLE)
    return big.resize((w, h), Image.LANCZOS)
