"""Procedural CT-, MR- and X-ray-like phantoms with named organs and 0-3 lesions, in 2-D or as small volumes.

Images follow the radiological convention: the patient's right is on the image's left, anterior at the
top. Values are in the modality's units: Hounsfield units for CT, arbitrary signal for MR, raw detector
values (0-4095, bright = dense) for X-ray. Every organ and lesion comes with its mask; organ masks do not
overlap and include the lesions inside them (as in LiTS/KiTS labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# (modality, region) -> organ intensities; "background" is outside the body, "body" soft tissue/fat.
INTENSITIES: dict[tuple[str, str], dict[str, float]] = {
    ("CT", "abdomen"): {
        "background": -1000, "body": -90, "muscle": 45, "liver": 60, "spleen": 48, "right kidney": 32,
        "left kidney": 32, "spine": 500, "aorta": 45, "noise": 12,
    },
    ("CT", "chest"): {
        "background": -1000, "body": -90, "muscle": 45, "right lung": -840, "left lung": -840, "heart": 42,
        "spine": 500, "aorta": 45, "noise": 14,
    },
    ("MR", "abdomen"): {
        "background": 5, "body": 650, "muscle": 160, "liver": 260, "spleen": 420, "right kidney": 380,
        "left kidney": 380, "spine": 220, "aorta": 60, "noise": 18,
    },
    ("X-ray", "chest"): {
        "background": 150, "body": 1900, "muscle": 2100, "right lung": 700, "left lung": 700, "heart": 2500,
        "spine": 3100, "aorta": 2300, "noise": 40,
    },
}
# Where lesions may grow, per (modality, region).
LESION_HOSTS = {
    ("CT", "abdomen"): ("liver", "spleen", "right kidney", "left kidney"),
    ("MR", "abdomen"): ("liver", "spleen", "right kidney", "left kidney"),
    ("CT", "chest"): ("right lung", "left lung"),
    ("X-ray", "chest"): ("right lung", "left lung"),
}
# The organs that prompts may name, per region (order is the drawing order).
ORGANS = {
    "abdomen": ("liver", "spleen", "right kidney", "left kidney"),
    "chest": ("right lung", "left lung", "heart"),
}
KINDS = (("CT", "abdomen"), ("CT", "chest"), ("MR", "abdomen"), ("X-ray", "chest"))
# Least gap between two lesions, as a fraction of the image side (7 px at 224, a quarter of a merged token's
# cell): touching lesions read as one blob, and "how many lesions?" would have no answer in the picture.
LESION_GAP = 0.03
MAX_WOBBLE = 0.15  # the largest wobble amplitude drawn below


@dataclass
class Ellipsoid:
    """An ellipsoid in normalised image coordinates (x, y in 0..1 of the image; z in slices)."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float = 0.0
    cz: float = 0.0
    rz: float = 1e9  # effectively a cylinder: 2-D phantoms use z = 0

    def mask(self, size: int, z: float = 0.0, wobble: tuple[float, int, float] | None = None) -> np.ndarray:
        """Boolean ``[size, size]`` cross-section at slice ``z`` (``wobble`` = amplitude, lobes, phase)."""
        dz = (z - self.cz) / self.rz
        if abs(dz) >= 1.0:
            return np.zeros((size, size), dtype=bool)
        shrink = float(np.sqrt(1.0 - dz * dz))
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        x, y = xx / size - self.cx, yy / size - self.cy
        c, s = np.cos(self.angle), np.sin(self.angle)
        u, v = (c * x + s * y) / (self.rx * shrink), (-s * x + c * y) / (self.ry * shrink)
        radius = np.sqrt(u * u + v * v)
        limit = 1.0
        if wobble is not None:
            amplitude, lobes, phase = wobble
            limit = 1.0 + amplitude * np.sin(lobes * np.arctan2(v, u) + phase)
        return radius <= limit


@dataclass
class Lesion:
    """A lesion: its shape, host organ and intensity offset."""

    shape: Ellipsoid
    host: str
    contrast: float
    wobble: tuple[float, int, float]


@dataclass
class Anatomy:
    """A body with organs and lesions; :meth:`render` draws any slice of it."""

    modality: str
    region: str
    size: int
    body: Ellipsoid
    organs: dict[str, list[Ellipsoid]]
    extras: dict[str, list[Ellipsoid]]  # muscle, spine, aorta: drawn, never named in prompts
    lesions: list[Lesion] = field(default_factory=list)
    spacing_mm: float = 1.6

    def render(self, rng: np.random.Generator, z: float = 0.0) -> Slice:
        """Values and masks of slice ``z`` (noise drawn from ``rng``)."""
        levels = INTENSITIES[(self.modality, self.region)]
        size = self.size
        values = np.full((size, size), levels["background"], dtype=np.float32)
        body = self.body.mask(size, z)
        values[body] = levels["body"]
        for name, parts in self.extras.items():
            for part in parts:
                values[part.mask(size, z) & body] = levels[name]
        masks: dict[str, np.ndarray] = {}
        for name in ORGANS[self.region]:
            region = np.zeros((size, size), dtype=bool)
            for part in self.organs[name]:
                region |= part.mask(size, z)
            region &= body
            for other in masks.values():
                other &= ~region  # later organs win where shapes touch
            masks[name] = region
            values[region] = levels[name]
        lesion_masks = []
        for lesion in self.lesions:
            shape = lesion.shape.mask(size, z, lesion.wobble) & masks[lesion.host]
            values[shape] += lesion.contrast
            lesion_masks.append(shape)
        if self.modality == "X-ray":
            values = _xray_projection(values, body)
        values += rng.normal(0.0, levels["noise"], values.shape).astype(np.float32)
        return Slice(self, values, masks, lesion_masks)


@dataclass
class Slice:
    """One rendered image: values in modality units, organ masks and one mask per visible lesion."""

    anatomy: Anatomy
    values: np.ndarray
    organs: dict[str, np.ndarray]
    lesions: list[np.ndarray]

    def visible_lesions(self, min_pixels: int = 12) -> list[tuple[Lesion, np.ndarray]]:
        """Lesions with at least ``min_pixels`` pixels in this slice, with their masks."""
        return [
            (lesion, mask)
            for lesion, mask in zip(self.anatomy.lesions, self.lesions, strict=True)
            if int(mask.sum()) >= min_pixels
        ]


def _reach(shape: Ellipsoid, size: int) -> np.ndarray:
    """Where a lesion of ``shape`` may draw in any slice and with any wobble, padded by half the lesion gap:
    two lesions whose reaches do not meet are at least :data:`LESION_GAP` apart everywhere."""
    pad = LESION_GAP / 2
    grown = Ellipsoid(
        shape.cx, shape.cy, shape.rx * (1 + MAX_WOBBLE) + pad, shape.ry * (1 + MAX_WOBBLE) + pad, shape.angle
    )
    return grown.mask(size)


def _xray_projection(values: np.ndarray, body: np.ndarray) -> np.ndarray:
    """A radiograph look: soft edges and a brighter centre line (summed depth), lungs stay dark."""
    blurred = _gaussian_blur(values, 1.2)
    size = values.shape[1]
    xx = np.arange(size, dtype=np.float32) / size
    depth = 1.0 + 0.25 * np.exp(-((xx - 0.5) ** 2) / 0.02)  # the mediastinum sums more tissue
    return np.where(body, blurred * depth[None, :], blurred)


def _gaussian_blur(values: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding (numpy only)."""
    radius = max(1, int(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    out = values.astype(np.float32)
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1, axis=axis)
        out = windows @ taps
    return out


def _jitter(rng: np.random.Generator, value: float, spread: float) -> float:
    return float(value + rng.uniform(-spread, spread))


def make_anatomy(
    rng: np.random.Generator,
    modality: str,
    region: str,
    size: int = 224,
    num_lesions: int | None = None,
    depth: int = 1,
) -> Anatomy:
    """A random body of the given kind with ``num_lesions`` lesions (0-3 at random when None).

    ``depth`` > 1 makes the organs ellipsoids spanning about that many slices (for volumes).
    """
    if (modality, region) not in INTENSITIES:
        raise ValueError(f"no phantom for {modality} {region}; choose from {sorted(INTENSITIES)}")
    zc, zr = (depth - 1) / 2.0, (max(depth, 1) * 0.75 if depth > 1 else 1e9)
    body, organs, extras = _layout(rng, modality, region, zc, zr)
    anatomy = Anatomy(modality, region, size, body, organs, extras, spacing_mm=float(rng.uniform(1.4, 1.8)))
    count = int(rng.integers(0, 4)) if num_lesions is None else int(num_lesions)
    tries = 0
    while len(anatomy.lesions) < count and tries < 200:
        tries += 1
        lesion = _draw_lesion(rng, anatomy, zc, depth)
        if lesion is not None:
            anatomy.lesions.append(lesion)
    return anatomy


def _layout(
    rng: np.random.Generator, modality: str, region: str, zc: float, zr: float
) -> tuple[Ellipsoid, dict[str, list[Ellipsoid]], dict[str, list[Ellipsoid]]]:
    """The body outline, the named organs and the unnamed extras (muscle, spine, aorta), jittered by ``rng``,
    centred on slice ``zc`` with depth radius ``zr``."""
    j = lambda v, s=0.02: _jitter(rng, v, s)  # noqa: E731

    def part(cx, cy, rx, ry, angle=0.0, rz_scale=1.0):
        return Ellipsoid(j(cx), j(cy), j(rx, 0.015), j(ry, 0.015), j(angle, 0.15), zc, zr * rz_scale)

    body = Ellipsoid(0.5, j(0.52, 0.01), j(0.44 if region == "abdomen" else 0.45, 0.02), j(0.34, 0.02), 0.0, zc, 1e9)
    if region == "abdomen":
        organs = {
            # patient's right = image left
            "liver": [part(0.33, 0.45, 0.17, 0.14, 0.3), part(0.42, 0.38, 0.12, 0.07, -0.2)],
            "spleen": [part(0.72, 0.44, 0.07, 0.10, -0.4)],
            "right kidney": [part(0.36, 0.66, 0.055, 0.075, 0.35, 0.8)],
            "left kidney": [part(0.64, 0.66, 0.055, 0.075, -0.35, 0.8)],
        }
        extras = {
            "muscle": [part(0.42, 0.74, 0.05, 0.06), part(0.58, 0.74, 0.05, 0.06)],
            "spine": [Ellipsoid(0.5, j(0.72, 0.01), 0.045, 0.045, 0.0, zc, 1e9)],
            "aorta": [Ellipsoid(j(0.52, 0.01), j(0.62, 0.01), 0.022, 0.022, 0.0, zc, 1e9)],
        }
    else:
        organs = {
            "right lung": [part(0.31, 0.48, 0.15, 0.24 if modality == "X-ray" else 0.2, 0.05)],
            "left lung": [part(0.69, 0.48, 0.14, 0.23 if modality == "X-ray" else 0.19, -0.05)],
            "heart": [part(0.56, 0.5, 0.11, 0.1, 0.4)],
        }
        extras = {
            "muscle": [],
            "spine": [Ellipsoid(0.5, j(0.78 if modality == "CT" else 0.5, 0.01), 0.04,
                                0.04 if modality == "CT" else 0.4, 0.0, zc, 1e9)],
            "aorta": [Ellipsoid(j(0.47, 0.01), j(0.6, 0.01), 0.025, 0.025, 0.0, zc, 1e9)],
        }
    return body, organs, extras


def _draw_lesion(rng: np.random.Generator, anatomy: Anatomy, zc: float, depth: int) -> Lesion | None:
    """One random lesion in one of the anatomy's host organs, or None when the draw does not fit: it must lie
    wholly inside its organ and stay :data:`LESION_GAP` apart from the lesions already placed."""
    modality, region, size = anatomy.modality, anatomy.region, anatomy.size
    hosts = LESION_HOSTS[(modality, region)]
    contrast_sign = {"CT": -1.0, "MR": 1.0, "X-ray": 1.0}[modality]
    host = hosts[int(rng.integers(0, len(hosts)))]
    organ = anatomy.organs[host][0]
    radius = float(rng.uniform(0.018, 0.055))
    shape = Ellipsoid(
        float(organ.cx + rng.uniform(-0.6, 0.6) * organ.rx),
        float(organ.cy + rng.uniform(-0.6, 0.6) * organ.ry),
        radius * float(rng.uniform(0.8, 1.2)),
        radius * float(rng.uniform(0.8, 1.2)),
        float(rng.uniform(0, np.pi)),
        zc + float(rng.uniform(-0.2, 0.2)) * depth,
        max(radius * size * 0.5, 1.5) if depth > 1 else 1e9,
    )
    mask = shape.mask(size, zc)
    host_mask = np.zeros((size, size), dtype=bool)
    for piece in anatomy.organs[host]:
        host_mask |= piece.mask(size, zc)
    # whole lesion inside its organ, and apart from the other lesions in every slice
    if mask.sum() < 20 or (mask & ~host_mask).any():
        return None
    reach = _reach(shape, size)
    if any((reach & _reach(other.shape, size)).any() for other in anatomy.lesions):
        return None
    levels = INTENSITIES[(modality, region)]
    if region == "chest":
        contrast = levels["muscle"] - levels[host] + float(rng.uniform(-20, 20))  # solid nodule in air
    else:
        magnitude = float(rng.uniform(35, 70)) if modality == "CT" else float(rng.uniform(200, 400))
        contrast = contrast_sign * magnitude * (1 if rng.uniform() < 0.8 else -1)
    wobble = (float(rng.uniform(0.0, MAX_WOBBLE)), int(rng.integers(2, 6)), float(rng.uniform(0, 2 * np.pi)))
    return Lesion(shape, host, contrast, wobble)
