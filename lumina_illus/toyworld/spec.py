"""The toy world's fixed roster: a dozen characters with distinct looks, their booru-style tags, and the
long-tailed number of training images each one gets.

The roster itself never depends on the seed (so tags, tagger and characters.csv are stable); the seed
drives every per-sample choice in world.py. Characters are listed most frequent first, and the most
frequent ones differ by large flat colour areas (hair, outfit), the first thing a tiny model learns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RGB = tuple[int, int, int]

# WD / danbooru tag categories (selected_tags.csv `category` column)
CATEGORY_GENERAL = 0
CATEGORY_COPYRIGHT = 3
CATEGORY_CHARACTER = 4
CATEGORY_META = 5
CATEGORY_RATING = 9

HAIR_COLORS: dict[str, RGB] = {
    "blue": (40, 90, 230),
    "red": (220, 30, 40),
    "green": (40, 170, 60),
    "blonde": (245, 215, 60),
    "pink": (250, 130, 190),
    "purple": (130, 60, 190),
    "white": (240, 240, 245),
    "black": (30, 30, 40),
    "orange": (250, 140, 30),
    "brown": (120, 70, 35),
    "aqua": (40, 210, 210),
    "grey": (140, 140, 150),
}
EYE_COLORS: dict[str, RGB] = {
    "blue": (30, 80, 220),
    "red": (210, 20, 30),
    "green": (30, 160, 50),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 200),
    "brown": (110, 60, 30),
    "aqua": (30, 200, 200),
    "pink": (240, 100, 170),
}
OUTFIT_COLORS: dict[str, RGB] = {
    "navy": (30, 40, 100),
    "white": (245, 245, 245),
    "red": (200, 30, 40),
    "yellow": (250, 210, 50),
    "green": (50, 140, 60),
    "black": (25, 25, 30),
    "pink": (245, 150, 200),
    "purple": (110, 50, 160),
    "orange": (240, 130, 30),
    "blue": (50, 110, 220),
    "grey": (120, 120, 130),
    "brown": (130, 85, 45),
}
HAIR_STYLES = ("long_hair", "short_hair", "twintails", "ponytail", "spiky_hair", "bob_cut")
OUTFITS = ("school_uniform", "dress", "hoodie", "armor", "kimono", "suit")
ACCESSORIES = ("hair_ribbon", "hat", "glasses", "cat_ears", "halo", "horns", "headphones", "hair_flower")


@dataclass(frozen=True)
class Character:
    name: str  # display name ("Aoi Hoshino")
    tag: str  # danbooru character tag ("hoshino_aoi")
    copyright: str  # danbooru copyright tag of the series it comes from
    gender: str  # "girl" | "boy" (count tag 1girl / 1boy)
    hair_color: str  # key of HAIR_COLORS
    hair_style: str  # one of HAIR_STYLES
    eye_color: str  # key of EYE_COLORS
    outfit: str  # one of OUTFITS
    outfit_color: str  # key of OUTFIT_COLORS
    accessory: str | None  # one of ACCESSORIES or None

    @property
    def count_tag(self) -> str:
        return "1girl" if self.gender == "girl" else "1boy"

    @property
    def prompt(self) -> str:
        """The trigger prompt of the recall evaluation: the words tag captions start with (the caption
        builder puts character and copyright tags first, then the shuffled general tags)."""
        return f"{tag_text(self.tag)}, {tag_text(self.copyright)}, {self.count_tag}"

    def look_tags(self) -> list[str]:
        """General tags describing the character's fixed appearance."""
        tags = [f"{self.hair_color}_hair", self.hair_style, f"{self.eye_color}_eyes", self.outfit]
        tags.append(f"{self.outfit_color}_{'dress' if self.outfit == 'dress' else 'clothes'}")
        if self.accessory:
            tags.append(self.accessory)
        return tags


def tag_text(tag: str) -> str:
    """Caption spelling of a danbooru tag: underscores become spaces (hoshino_aoi -> hoshino aoi)."""
    return tag.replace("_", " ")


# Most frequent first. Every (hair colour, outfit colour) pair is unique, and so are hair colours.
CHARACTERS: tuple[Character, ...] = (
    Character("Aoi Hoshino", "hoshino_aoi", "star_academy", "girl", "blue", "long_hair", "yellow", "school_uniform", "navy", "hair_ribbon"),
    Character("Akane Hino", "hino_akane", "star_academy", "girl", "red", "twintails", "green", "dress", "yellow", None),
    Character("Midori Mori", "mori_midori", "forest_tales", "girl", "green", "bob_cut", "brown", "kimono", "pink", "hair_flower"),
    Character("Kou Kiriyama", "kiriyama_kou", "mecha_city", "boy", "blonde", "spiky_hair", "blue", "armor", "grey", None),
    Character("Momo Sakura", "sakura_momo", "star_academy", "girl", "pink", "ponytail", "purple", "hoodie", "white", "cat_ears"),
    Character("Shion Yoru", "yoru_shion", "forest_tales", "girl", "purple", "long_hair", "red", "dress", "black", "hat"),
    Character("Yuki Shirane", "shirane_yuki", "mecha_city", "girl", "white", "short_hair", "aqua", "suit", "blue", "headphones"),
    Character("Ren Kurosawa", "kurosawa_ren", "mecha_city", "boy", "black", "short_hair", "red", "suit", "white", "glasses"),
    Character("Mikan Tachibana", "tachibana_mikan", "forest_tales", "girl", "orange", "twintails", "blue", "school_uniform", "green", None),
    Character("Taro Tsuchida", "tsuchida_taro", "forest_tales", "boy", "brown", "spiky_hair", "green", "hoodie", "orange", "horns"),
    Character("Mizu Aizawa", "aizawa_mizu", "star_academy", "girl", "aqua", "bob_cut", "pink", "kimono", "purple", "halo"),
    Character("Hai Nezumi", "nezumi_hai", "mecha_city", "girl", "grey", "ponytail", "yellow", "armor", "red", "glasses"),
)  # fmt: skip


def long_tail_counts(n: int, most: int, fewest: int) -> list[int]:
    """Geometric long tail: `most` images for the first character down to `fewest` for the last."""
    if n < 1 or most < fewest or fewest < 1:
        raise ValueError(f"long_tail_counts: need n >= 1 and most >= fewest >= 1, got {n=}, {most=}, {fewest=}")
    if n == 1:
        return [most]
    ratio = fewest / most
    return [max(fewest, round(most * math.pow(ratio, i / (n - 1)))) for i in range(n)]


BACKGROUNDS = ("white", "blue", "pink", "gradient", "outdoors", "night", "indoors", "sunset")
BACKGROUND_TAGS: dict[str, list[str]] = {
    "white": ["simple_background", "white_background"],
    "blue": ["simple_background", "blue_background"],
    "pink": ["simple_background", "pink_background"],
    "gradient": ["gradient_background"],
    "outdoors": ["outdoors", "sky", "grass", "day"],
    "night": ["outdoors", "night", "night_sky", "star_(sky)"],
    "indoors": ["indoors", "wooden_floor"],
    "sunset": ["outdoors", "sunset", "orange_sky"],
}
POSES = ("standing", "arms_up", "waving", "hands_on_hips")
POSE_TAGS: dict[str, list[str]] = {
    "standing": ["standing"],
    "arms_up": ["arms_up"],
    "waving": ["waving"],
    "hands_on_hips": ["hands_on_hips"],
}
FRAMINGS = ("full_body", "upper_body")
EXPRESSIONS = ("smile", "open_mouth", "closed_mouth")
# (width, height) in pixels: small sides so CPU training works, several aspect ratios
SIZES: tuple[tuple[int, int], ...] = ((64, 64), (96, 96), (128, 128), (96, 64), (64, 96), (128, 96), (96, 128))
RATING = "general"
