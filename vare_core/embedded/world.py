"""The synthetic "shapes world" of the embedded default model: renderer and prompt generator.

Every image is 64x64 RGB: one flat shape (circle, square, triangle with its apex up, or a plus-sign
cross) on a flat white, black or gray background. The shape is axis aligned, 40-80% of the canvas
wide, fully inside it, coloured red, green, blue, yellow or purple, and either solid or striped
(diagonal stripes alternating the colour and a darker shade of it). Prompts come from templates
with synonyms ("a striped blue square", "a photo of a wedge", "a red disc on a white background").
Evaluation tools outside this repository rely on these rules: keep them exactly.

Usage:
    rng = np.random.default_rng(0)
    scene = random_scene(rng, shape="circle")          # other attributes random
    image = render(scene)                               # (64, 64, 3) uint8
    prompt = describe(scene, rng)                       # "a striped red disc on a gray background"
    prompt_attributes(prompt)                           # {"shape": "circle", "color": "red", ...}
    images, prompts, scenes = make_dataset(1000, seed=0)

Scene geometry is in pixels of the canonical 64 px canvas; `render(scene, size=128)` scales it.
"""
import math
import re
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple")
BACKGROUNDS = ("white", "black", "gray")
STYLES = ("solid", "striped")
ATTRIBUTES = ("shape", "color", "background", "style")

# shape -> the words/phrases that name it, main word first
SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge"),
    "cross": ("cross", "plus sign"),
}
GENERIC_SHAPE_WORD = "shape"  # names any of the four shapes

CANVAS = 64                      # scene coordinates are pixels of this canvas
MIN_SIZE_PX = math.ceil(0.4 * CANVAS)   # 26: shape bounding box is 40-80% of the canvas
MAX_SIZE_PX = math.floor(0.8 * CANVAS)  # 51
EDGE_MARGIN_PX = 1.0             # keeps a line of background between shape and border
SUPERSAMPLE = 4                  # render at 4x and box-downsample: clean, deterministic edges
STRIPE_PERIOD_PX = 8.0           # measured across the stripes; survives a downsample-8 autoencoder
DARK_SHADE = 0.55                # stripe shade = 0.55 x the colour

# Saturated colours, each far from every background (yellow vs white differ by ~235 in blue).
COLOR_RGB = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 80, 230),
    "yellow": (240, 210, 20),
    "purple": (150, 50, 200),
}
BACKGROUND_RGB = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    style: str
    size_px: int     # side of the shape's bounding box (circle: diameter)
    cx: float        # centre of the bounding box, pixels of the 64 px canvas
    cy: float

    def __post_init__(self):
        for name, allowed in (("shape", SHAPES), ("color", COLORS),
                              ("background", BACKGROUNDS), ("style", STYLES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Scene {name}={getattr(self, name)!r} is not one of {allowed}")
        if not self.size_px > 0:
            raise ValueError(f"Scene size_px must be positive, got {self.size_px}")


# ----------------------------------------------------------------------------- rendering

def shape_mask(scene: Scene, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of the shape at canvas coordinates x (1, W) and y (H, 1)."""
    dx, dy, half = x - scene.cx, y - scene.cy, scene.size_px / 2
    if scene.shape == "circle":
        return dx * dx + dy * dy <= half * half
    if scene.shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if scene.shape == "triangle":  # isosceles, apex at top centre, base = height = size
        depth = dy + half           # 0 at the apex, size at the base
        return (depth >= 0) & (depth <= 2 * half) & (np.abs(dx) <= depth / 2)
    arm = half / 3                  # cross: arm width is 1/3 of the size
    vertical = (np.abs(dx) <= arm) & (np.abs(dy) <= half)
    horizontal = (np.abs(dy) <= arm) & (np.abs(dx) <= half)
    return vertical | horizontal


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """Render a scene as a (size, size, 3) uint8 RGB image (anti-aliased by 4x supersampling)."""
    if size < 8:
        raise ValueError(f"render size must be at least 8 px, got {size}")
    n = size * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) * np.float32(CANVAS / n)  # sub-pixel centres
    x, y = coords[None, :], coords[:, None]
    mask = shape_mask(scene, x, y)
    if scene.style == "striped":  # diagonal bands, half colour, half darker shade
        band = np.floor((x + y) * np.float32(2 / (math.sqrt(2) * STRIPE_PERIOD_PX)))
        dark = mask & (band % 2 == 1)
    else:
        dark = np.zeros_like(mask)

    def coverage(sub_mask):  # fraction of each output pixel covered (box downsample)
        return sub_mask.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))[..., None]

    colour = np.array(COLOR_RGB[scene.color], dtype=np.float64)
    background = np.array(BACKGROUND_RGB[scene.background], dtype=np.float64)
    shape_cover, dark_cover = coverage(mask), coverage(dark)
    small = ((1 - shape_cover) * background + (shape_cover - dark_cover) * colour
             + dark_cover * colour * DARK_SHADE)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- scenes

def random_scene(rng: np.random.Generator, **fixed) -> Scene:
    """A random scene; keyword arguments (shape, color, background, style, size_px, cx, cy) fix
    attributes, None meaning random. All values are always drawn, so fixing one attribute leaves
    the others identical for the same rng state."""
    unknown = set(fixed) - {"shape", "color", "background", "style", "size_px", "cx", "cy"}
    if unknown:
        raise ValueError(f"random_scene got unknown attributes {sorted(unknown)}")
    drawn = {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "color": COLORS[rng.integers(len(COLORS))],
        "background": BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
        "style": STYLES[rng.integers(len(STYLES))],
        "size_px": int(rng.integers(MIN_SIZE_PX, MAX_SIZE_PX + 1)),
    }
    position = rng.random(2)
    drawn.update({k: v for k, v in fixed.items() if v is not None and k not in ("cx", "cy")})
    # Centre anywhere that keeps the whole bounding box (plus a margin) on the canvas.
    low = drawn["size_px"] / 2 + EDGE_MARGIN_PX
    span = max(CANVAS - 2 * low, 0.0)
    cx, cy = fixed.get("cx"), fixed.get("cy")
    drawn["cx"] = float(low + position[0] * span) if cx is None else float(cx)
    drawn["cy"] = float(low + position[1] * span) if cy is None else float(cy)
    return Scene(**drawn)


# ----------------------------------------------------------------------------- prompts

FRAMES = ("{}", "a {}", "a picture of a {}", "a photo of a {}", "an image of a {}",
          "a drawing of a {}")
STYLE_BEFORE = {"solid": ("solid", "plain"), "striped": ("striped",)}
STYLE_AFTER = {"solid": (), "striped": ("with stripes", "with diagonal stripes")}
BACKGROUND_PHRASES = ("on a {} background", "on {}", "against a {} background")
MENTION_PROBABILITY = {"shape": 0.85, "color": 0.7, "background": 0.5, "style": 0.5}


def _with_article(frame: str, noun_phrase: str) -> str:
    """Fill a frame, turning its trailing "a" into "an" before a vowel."""
    text = frame.format(noun_phrase)
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


def _pick(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def describe(scene: Scene, rng: np.random.Generator, *, mention=ATTRIBUTES,
             shape_word: str | None = None) -> str:
    """A prompt for the scene from the templates.

    mention: the attributes to state (default all four); None draws a random subset, as in the
    embedded model's training data. Unmentioned attributes are left out of the text ("a blue
    shape"). shape_word: the synonym naming the shape (default: a random one of SYNONYMS)."""
    if mention is None:
        mention = tuple(a for a in ATTRIBUTES if rng.random() < MENTION_PROBABILITY[a])
    mention = tuple(mention)
    if set(mention) - set(ATTRIBUTES):
        raise ValueError(f"describe mention={mention} may only contain {ATTRIBUTES}")
    if shape_word is not None and shape_word not in SYNONYMS[scene.shape] + (GENERIC_SHAPE_WORD,):
        raise ValueError(f"shape_word {shape_word!r} does not name a {scene.shape}; "
                         f"use one of {SYNONYMS[scene.shape]} or {GENERIC_SHAPE_WORD!r}")

    noun = GENERIC_SHAPE_WORD
    if "shape" in mention:
        noun = shape_word if shape_word is not None else _pick(rng, SYNONYMS[scene.shape])
    before, after = [], []
    if "style" in mention:
        places = [(before, w) for w in STYLE_BEFORE[scene.style]] + \
                 [(after, w) for w in STYLE_AFTER[scene.style]]
        place, words = places[rng.integers(len(places))]
        place.append(words)
    if "color" in mention:
        before.append(scene.color)
    if "background" in mention:
        after.append(_pick(rng, BACKGROUND_PHRASES).format(scene.background))
    noun_phrase = " ".join(before + [noun] + after)
    return _with_article(_pick(rng, FRAMES), noun_phrase)


def _parse_table() -> dict[tuple[str, ...], tuple[str, str]]:
    """Phrase (tuple of words) -> (attribute, value); "shape" alone constrains nothing."""
    table = {tuple(word.split()): ("shape", shape)
             for shape, words in SYNONYMS.items() for word in words}
    table.update({(c,): ("color", c) for c in COLORS})
    table.update({(b,): ("background", b) for b in BACKGROUNDS})
    table[("grey",)] = ("background", "gray")
    table.update({(w,): ("style", "striped") for w in ("striped", "stripes", "stripe", "stripy")})
    table.update({(w,): ("style", "solid") for w in ("solid", "plain")})
    table.update({(neg, w): ("style", "solid") for neg in ("no", "without")
                  for w in ("stripes", "stripe")})
    return table


_PHRASES = _parse_table()
_LONGEST_PHRASE = max(len(p) for p in _PHRASES)


def prompt_attributes(prompt: str) -> dict:
    """The attributes a prompt states, e.g. {"shape": "circle", "color": "red"}.

    Shapes are recognised by any synonym; the word "shape" alone sets no shape. Raises ValueError
    when a prompt states two different values of one attribute ("a red blue circle")."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    words = re.findall(r"[a-z]+", prompt.lower())
    found: dict[str, str] = {}
    i = 0
    while i < len(words):
        for length in range(_LONGEST_PHRASE, 0, -1):  # longest match first: "round shape"
            hit = _PHRASES.get(tuple(words[i:i + length]))
            if hit:
                attribute, value = hit
                if found.get(attribute, value) != value:
                    raise ValueError(f"prompt {prompt!r} states two {attribute}s: "
                                     f"{found[attribute]!r} and {value!r}")
                found[attribute] = value
                i += length
                break
        else:
            i += 1
    return found


def _vocabulary() -> list[str]:
    pieces = list(FRAMES) + list(BACKGROUND_PHRASES) + list(COLORS) + list(BACKGROUNDS)
    pieces += [w for words in SYNONYMS.values() for w in words] + [GENERIC_SHAPE_WORD, "grey"]
    pieces += [w for words in STYLE_BEFORE.values() for w in words]
    pieces += [w for words in STYLE_AFTER.values() for w in words]
    words = {w for piece in pieces for w in re.findall(r"[a-z]+", piece)}
    return sorted(words | {"an"})


VOCABULARY: list[str] = _vocabulary()  # every word a template can produce (+ "grey")


# ----------------------------------------------------------------------------- datasets

def make_dataset(n: int, seed: int, size: int = 64):
    """n random scenes with their renders and prompts, deterministic from seed.

    Returns (images (n, size, size, 3) uint8, prompts, scenes); the prompts mention random subsets
    of the attributes with random synonyms, as in the embedded model's training data."""
    if n < 0:
        raise ValueError(f"make_dataset n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    prompts, scenes = [], []
    for i in range(n):
        scene = random_scene(rng)
        prompts.append(describe(scene, rng, mention=None))
        scenes.append(scene)
        images[i] = render(scene, size)
    return images, prompts, scenes
